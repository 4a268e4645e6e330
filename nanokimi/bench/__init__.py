"""`nanokimi bench ...`: measured, reproducible comparisons. Each writes a section of BENCHMARKS.md (with the exact
command, machine, torch version and date) and its plots under assets/.

    moe-scaling   one MoE layer's fwd+bwd time as n_routed_experts grows at fixed top-k
    inference     decode tokens/s and peak memory (MLA cache, no cache, MHA ablation, nanoGPT baseline), KV bytes
    optim         AdamW vs Muon vs MuonClip on shakespeare_char, and a high-LR stress run (max logits)
    qk-overhead   cost of MuonClip's max-logit recording + QK-Clip in a training step
    compare       nanoKimi vs the nanoGPT baseline at equal wall-clock and tokens, ablations, throughput/MFU

Layout: report.py (sections, tables, plots, timing), speed.py (benchmarks on random data), training.py (benchmarks
through the trainer), cli.py (the subcommands)."""
