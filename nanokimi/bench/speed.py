"""Speed benchmarks on random data: one MoE layer as experts grow, decoding with and without caches, and the cost of
MuonClip's max-logit recording."""

import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from ..baseline import GPT
from ..model import ATTENTION, Kimi, MoE
from ..optim import configure_optimizer
from ..presets import BASELINE_PRESETS, PRESETS, make_config
from .report import table, timings, write_section


def bench_moe_scaling(args):
    base = PRESETS[args.preset]
    rows, times = [], {}
    x = torch.randn(args.batch, args.seq, base.hidden_size)
    for experts in args.experts:
        config = make_config("kimi", base, {"n_routed_experts": experts, "num_experts_per_tok": args.top_k})
        torch.manual_seed(0)
        moe = MoE(config)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        inputs = x.clone().requires_grad_()

        def step():
            moe(inputs)[0].square().mean().backward()
        times[experts] = statistics.median(timings(step, args.repeats))
        params = sum(p.numel() for p in moe.parameters())
        rows.append([experts, args.top_k, f"{params / 1e6:.2f}M", f"{times[experts] * 1e3:.1f}",
                     f"{times[experts] / times[args.experts[0]]:.2f}x"])
    body = (f"One MoE layer of `{args.preset}` (hidden {base.hidden_size}, expert width {base.moe_intermediate_size}, "
            f"1 shared expert), {args.batch * args.seq} tokens, forward+backward, median of {args.repeats}.\n\n"
            + table(["routed experts", "top-k", "layer params", "fwd+bwd ms", "vs first"], rows)
            + f"\n\nGoal: <= 1.5x at {args.experts[-1]} experts vs {args.experts[0]}: "
              f"measured {times[args.experts[-1]] / times[args.experts[0]]:.2f}x.")
    print(body)
    write_section(args.report, "moe-scaling", body, args.command)



def kv_bytes_per_token_layer(config, dtype=torch.bfloat16):
    """Bytes one token adds to one layer's inference cache, read off the cache nanoKimi allocates (on meta)."""
    cache = ATTENTION[config.attention].cache(config, 1, 1, "meta", dtype)
    return sum(t.nbytes for t in vars(cache).values() if isinstance(t, torch.Tensor) and t._base is None)


def decode_timing(model, prompt, new_tokens, use_cache):
    """(seconds to the first token, tokens/s for the rest) of one greedy generation."""
    t0 = time.perf_counter()
    tokens = model.stream(prompt, new_tokens, temperature=0, use_cache=use_cache)
    next(tokens)
    t1 = time.perf_counter()
    for _ in tokens:
        pass
    return t1 - t0, (new_tokens - 1) / (time.perf_counter() - t1)


def peak_memory(model, prompt, new_tokens, use_cache):
    """Peak bytes of live tensors (weights, cache, activations) during one generation, tracked per storage by
    torch's MemTracker (a dispatch mode, so it runs apart from the timed generations: it slows every op)."""
    tracker = MemTracker()
    tracker.track_external(model, prompt)
    with tracker:
        for _ in model.stream(prompt, new_tokens, temperature=0, use_cache=use_cache):
            tracker.reset_mod_stats()  # per-module stats only (it refuses repeated root calls); the peak stays
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def bench_inference(args):
    kimi_base, gpt_base = PRESETS[args.preset], BASELINE_PRESETS[args.baseline]
    longest = max(args.contexts) + args.new_tokens
    torch.manual_seed(0)
    kimi = Kimi(make_config("kimi", kimi_base, {"max_position_embeddings": longest, "dropout": 0.0})).eval()
    mha = Kimi(make_config("kimi", kimi.config, {"attention": "mha"})).eval()
    gpt = GPT(make_config("gpt", gpt_base, {"n_positions": longest, "dropout": 0.0})).eval()
    contenders = (("nanoKimi, MLA cache", kimi, True), ("nanoKimi, no cache", kimi, False),
                  ("nanoKimi-MHA ablation, KV cache", mha, True), ("nanoGPT baseline, no cache", gpt, False))
    rows = []
    speed = {}
    for context in args.contexts:
        prompt = torch.randint(0, kimi.config.vocab_size, (1, context))
        for label, model, cache in contenders:
            runs = [decode_timing(model, prompt, args.new_tokens, cache) for _ in range(args.repeats + 1)][1:]
            first = statistics.median(r[0] for r in runs)
            speed[label, context] = statistics.median(r[1] for r in runs)
            peak = peak_memory(model, prompt, args.new_tokens, cache)
            rows.append([context, label, f"{first * 1e3:.0f}", f"{speed[label, context]:.0f}",
                         f"{peak / 2 ** 20:.2f}"])
    ratio = speed["nanoKimi, MLA cache", max(args.contexts)] / speed["nanoGPT baseline, no cache", max(args.contexts)]
    c, k2 = kimi.config, PRESETS["kimi-k2"]
    k2_mha = make_config("kimi", k2, {"attention": "mha"})
    body = (f"Greedy decode of {args.new_tokens} tokens after a random prompt of the given length, batch 1, "
            f"fp32, median of {args.repeats} runs after one warm-up. First token = prefill + 1 token; decode "
            f"tokens/s counts the tokens after the first; peak memory = live tensors (weights, cache, activations) "
            f"during one generation, tracked by torch's MemTracker. Models: `{args.preset}` "
            f"({kimi.num_params()['total'] / 1e6:.2f}M params), its MHA ablation "
            f"({mha.num_params()['total'] / 1e6:.2f}M) and `{args.baseline}` "
            f"({gpt.num_params()['total'] / 1e6:.2f}M), random weights (speed does not depend on them).\n\n"
            + table(["context", "model", "first token ms", "decode tokens/s", "peak memory MiB"], rows)
            + f"\n\nMLA-cached decode vs the uncached baseline at context {max(args.contexts)}: {ratio:.1f}x "
              f"(goal >= 5x).\n\nKV-cache bytes per token per layer (bf16), read off the caches nanoKimi "
              f"allocates:\n\n"
            + table(["cache", "bytes"], [
                [f"MLA latent + rope key ({c.kv_lora_rank}+{c.qk_rope_head_dim})", kv_bytes_per_token_layer(c)],
                [f"MHA ablation, same heads and dims ({c.num_attention_heads}x({c.qk_head_dim}+{c.v_head_dim}))",
                 kv_bytes_per_token_layer(mha.config)],
                [f"baseline MHA at width {gpt.config.n_embd} (K and V; nanoGPT itself has no cache)",
                 2 * gpt.config.n_embd * 2],
                [f"Kimi-K2 MLA ({k2.kv_lora_rank}+{k2.qk_rope_head_dim})", kv_bytes_per_token_layer(k2)],
                [f"Kimi-K2 heads as MHA ({k2.num_attention_heads}x({k2.qk_head_dim}+{k2.v_head_dim}))",
                 kv_bytes_per_token_layer(k2_mha)]]))
    print(body)
    write_section(args.report, "inference", body, args.command)



def bench_qk_overhead(args):
    """Training-step time with Muon alone vs MuonClip (max-logit recording + clipping), same model and batch."""
    config = make_config("kimi", PRESETS[args.preset], {"max_position_embeddings": args.block_size})
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1))
    times = {}
    for name in ("muon", "muonclip") * args.rounds:  # interleaved rounds against drift on a shared machine
        torch.manual_seed(0)
        model = Kimi(config)
        opt = configure_optimizer(model, name, lr=2e-3)

        def step():
            _, loss, *max_logits = model(x[:, :-1], x[:, 1:], record_max_logits=opt.needs_max_logits)
            loss.backward()
            opt.step(max_logits=max_logits[0] if max_logits else None)
            opt.zero_grad()
            model.update_expert_bias()
        times.setdefault(name, []).append(statistics.median(timings(step, args.repeats)))
    muon, clip = statistics.median(times["muon"]), statistics.median(times["muonclip"])
    body = (f"`{args.preset}`, batch {args.batch_size}x{args.block_size}, one full training step (forward, "
            f"backward, optimizer step, expert-bias update), median of {args.repeats} steps, each optimizer "
            f"measured {args.rounds} times, interleaved (median of the medians).\n\n"
            + table(["optimizer", "step ms"], [["muon (no logit recording)", f"{muon * 1e3:.1f}"],
                                                ["muonclip (recording + QK-Clip)", f"{clip * 1e3:.1f}"]])
            + f"\n\nQK-Clip overhead: {100 * (clip / muon - 1):+.1f}% of a training step (goal < 20%).")
    print(body)
    write_section(args.report, "qk-clip-overhead", body, args.command)
