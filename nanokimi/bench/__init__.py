"""`nanokimi bench ...`: measured, reproducible comparisons. Each writes a section of BENCHMARKS.md (with the exact
command, machine, torch version and date) and its plots under assets/.

    moe-scaling   one MoE layer's fwd+bwd time as n_routed_experts grows at fixed top-k
    inference     decode tokens/s and peak memory (MLA cache, no cache, MHA ablation, nanoGPT baseline), KV bytes
    optim         AdamW vs Muon vs MuonClip on shakespeare_char, and a high-LR stress run (max logits)
    memory        per-rank training state and bytes sent: one process, DDP x2, FSDP2 x2, FSDP2+EP x2; K2 projected
    step          ms per training step, nanoKimi (MuonClip, AdamW) vs the baseline, and nanoKimi's step part by part
    compare       nanoKimi's shipped config vs nanoGPT's own recipe (CPU or GPU): time to the recipe's val loss
    sweep         the CPU config's batch shape, lr, warmup and dims, each run at the same time budget
    ablate        each Kimi-K2 idea removed, and nanoGPT three ways: equal time and equal tokens, seeds
    prepare       nanokimi prepare's MB/s and peak memory on 10 MB..1 GB corpora in each format, vs the tokenizer
    chat          a chat run's held-out exact match on chat_tasks.py's conversations, calculator on and off
    serve         nanokimi serve's aggregate tokens/s and time to first token with 1, 4 and 16 streaming clients

Layout: report.py (sections, tables, plots, timing), speed.py (benchmarks on random data), training.py (benchmarks
through the trainer), ablation.py (the ablation, through the trainer), corpora.py (data preparation), chat_tasks.py
and chat.py (the chat recipe's conversations and their scoring), serve.py (a served model under load), cli.py
(the subcommands)."""
