"""Speed benchmarks on random data: one MoE layer as experts grow, decoding with and without caches, and the training
step of nanoKimi against the baseline, part by part."""

import dataclasses
import statistics
import time
from functools import partial

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from ..baseline import GPT
from ..hardware import compile_model
from ..model import ATTENTION, Kimi, MoE
from ..optim import configure_optimizer, zeropower_via_newtonschulz
from ..models import BASELINE_PRESETS, PRESETS, build_model, check_fits, make_config
from .report import hardware_kind, interleaved_medians, spread_ms, table, timings, write_section

HYBRID_PATTERN = ["linear_attention"] * 3 + ["full_attention"]  # Kimi Linear's 3:1


def hybrid_layers(layers):
    """Kimi Linear's layout in `layers` layers: KDA, with MLA every fourth."""
    return [HYBRID_PATTERN[i % 4] for i in range(layers)]


HYBRID = "Kimi Linear hybrid (3 KDA : 1 MLA) + MuonClip"


def bench_moe_scaling(args):
    base = PRESETS[args.preset]
    x = torch.randn(args.batch, args.seq, base.hidden_size)
    steps, params = {}, {}
    for experts in args.experts:
        config = make_config("kimi", base, {"n_routed_experts": experts, "num_experts_per_tok": args.top_k})
        torch.manual_seed(0)
        moe = MoE(config)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        params[experts] = sum(p.numel() for p in moe.parameters())
        steps[experts] = partial(moe_step, moe, x.clone().requires_grad_())
    rounds = interleaved_medians(steps, args.rounds, args.repeats)
    first = statistics.median(rounds[args.experts[0]])
    ratio = {e: statistics.median(r) / first for e, r in rounds.items()}
    rows = [[e, args.top_k, f"{params[e] / 1e6:.2f}M", spread_ms(r), f"{ratio[e]:.2f}x"] for e, r in rounds.items()]
    body = (
        f"One MoE layer of `{args.preset}` (hidden {base.hidden_size}, expert width {base.moe_intermediate_size}, "
        f"1 shared expert), {args.batch * args.seq} tokens, forward+backward: each layer's median of "
        f"{args.repeats} steps, measured in {args.rounds} interleaved rounds; the table gives the median "
        f"(min..max) of the rounds.\n\n"
        + table(["routed experts", "top-k", "layer params", "fwd+bwd ms", "vs first"], rows)
        + f"\n\nGoal: <= 1.5x at {args.experts[-1]} experts vs {args.experts[0]}: "
        f"measured {ratio[args.experts[-1]]:.2f}x."
    )
    print(body)
    write_section(args.report, "moe-scaling", body, args.command)


def moe_step(moe, inputs):
    moe(inputs)[0].square().mean().backward()


def kv_bytes_per_token_layer(config, dtype=torch.bfloat16):
    """Bytes one token adds to one layer's inference cache, read off the cache nanoKimi allocates (on meta)."""
    return cache_nbytes(ATTENTION[config.attention].cache(config, 1, 1, "meta", dtype))


def cache_nbytes(cache):
    """Bytes an inference cache allocates: its tensors (ROWS), not the views into them."""
    return sum(getattr(cache, name).nbytes for name in cache.ROWS)


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
    kimi_config = make_config("kimi", kimi_base, {"max_position_embeddings": longest, "dropout": 0.0})
    kimi = build_model("kimi", kimi_config, context=f"--preset={args.preset}").eval()
    mha = build_model(
        "kimi", make_config("kimi", kimi_config, {"attention": "mha"}), context=f"--preset={args.preset} as MHA"
    ).eval()
    gpt = build_model(
        "gpt",
        make_config("gpt", gpt_base, {"n_positions": longest, "dropout": 0.0}),
        context=f"--baseline={args.baseline}",
    ).eval()
    contenders = (
        ("nanoKimi, MLA cache", kimi, True),
        ("nanoKimi, no cache", kimi, False),
        ("nanoKimi-MHA ablation, KV cache", mha, True),
        ("nanoGPT baseline, no cache", gpt, False),
    )
    rows = []
    speed = {}
    for context in args.contexts:
        prompt = torch.randint(0, kimi.config.vocab_size, (1, context))
        for label, model, cache in contenders:
            runs = [decode_timing(model, prompt, args.new_tokens, cache) for _ in range(args.repeats + 1)][1:]
            first = statistics.median(r[0] for r in runs)
            speed[label, context] = statistics.median(r[1] for r in runs)
            peak = peak_memory(model, prompt, args.new_tokens, cache)
            rows.append([context, label, f"{first * 1e3:.0f}", f"{speed[label, context]:.0f}", f"{peak / 2**20:.2f}"])
    ratio = speed["nanoKimi, MLA cache", max(args.contexts)] / speed["nanoGPT baseline, no cache", max(args.contexts)]
    c, k2 = kimi.config, PRESETS["kimi-k2"]
    k2_mha = make_config("kimi", k2, {"attention": "mha"})
    body = (
        f"Greedy decode of {args.new_tokens} tokens after a random prompt of the given length, batch 1, "
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
        + table(
            ["cache", "bytes"],
            [
                [f"MLA latent + rope key ({c.kv_lora_rank}+{c.qk_rope_head_dim})", kv_bytes_per_token_layer(c)],
                [
                    f"MHA ablation, same heads and dims ({c.num_attention_heads}x({c.qk_head_dim}+{c.v_head_dim}))",
                    kv_bytes_per_token_layer(mha.config),
                ],
                [
                    f"baseline MHA at width {gpt.config.n_embd} (K and V; nanoGPT itself has no cache)",
                    2 * gpt.config.n_embd * 2,
                ],
                [f"Kimi-K2 MLA ({k2.kv_lora_rank}+{k2.qk_rope_head_dim})", kv_bytes_per_token_layer(k2)],
                [
                    f"Kimi-K2 heads as MHA ({k2.num_attention_heads}x({k2.qk_head_dim}+{k2.v_head_dim}))",
                    kv_bytes_per_token_layer(k2_mha),
                ],
            ],
        )
    )
    print(body)
    write_section(args.report, "inference", body, args.command)


def training_step(model, opt, x, y, dtype=torch.float32, net=None):
    """One training step as the trainer runs it: forward (recording max logits when the optimizer asks; under
    autocast to `dtype` unless fp32) through `net` (a DDP or torch.compile wrapper, else the model), backward,
    gradient clipping, optimizer step with QK-Clip, expert-bias update."""
    net = model if net is None else net
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss, *max_logits = net(x, y, record_max_logits=True) if opt.needs_max_logits else net(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(max_logits=max_logits[0] if max_logits else None)
    opt.zero_grad()
    model.update_expert_bias(1e-3)


def forward_seconds(groups, run):
    """Seconds spent inside the forward of each group's modules ({label: modules}) while `run()` executes (hooks)."""
    spent, started, handles = dict.fromkeys(groups, 0.0), {}, []
    for label, modules in groups.items():
        for module in modules:

            def begin(module, args):
                started[module] = time.perf_counter()

            def end(module, args, output, label=label):
                spent[label] += time.perf_counter() - started[module]

            handles += [module.register_forward_pre_hook(begin), module.register_forward_hook(end)]
    run()
    for h in handles:
        h.remove()
    return spent


NS_FLOOR = "  Newton-Schulz's FLOPs at this machine's matmul peak in its dtype (its floor)"


def newton_schulz_flops(shapes, steps=5):
    """FLOPs of the quintic Newton-Schulz on matrices of these (rows, cols): per iteration, with m <= n the short and
    long side, X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n)."""
    return sum(steps * (4 * m * m * n + 2 * m**3) for m, n in (sorted(shape) for shape in shapes))


def batched_matmul_peak(repeats, dtype):
    """FLOP/s of this machine's best batched matmul in `dtype` on Muon-sized matrices (72 of 128 x 128), best of
    repeats."""
    a = torch.randn(72, 128, 128, dtype=dtype)
    return 2 * 72 * 128**3 / min(timings(lambda: a @ a, max(repeats, 10)))


def step_breakdown(model, opt, x, y, repeats):
    """Median ms of the parts of nanoKimi's MuonClip step."""

    def median_ms(fn):
        return statistics.median(timings(fn, repeats)) * 1e3

    forward = median_ms(lambda: model(x, y, record_max_logits=True))
    unrecorded = median_ms(lambda: model(x, y))
    backward = median_ms(lambda: model(x, y, record_max_logits=True)[1].backward()) - forward
    opt.zero_grad()
    _, loss, max_logits = model(x, y, record_max_logits=True)
    loss.backward()
    optimizer = median_ms(lambda: opt.step(max_logits=max_logits))
    by_shape = {}  # the Muon matrices' gradients, stacked per shape as Muon batches them
    for p in opt.optimizers[-1].param_groups[0]["params"]:
        by_shape.setdefault(tuple(p.shape[-2:]), []).append(p.grad.reshape(-1, *p.shape[-2:]))
    stacks = [torch.cat(grads) for grads in by_shape.values()]
    ns_dtype = opt.optimizers[-1].ns_dtype
    newton_schulz = median_ms(lambda: [zeropower_via_newtonschulz(g, dtype=ns_dtype) for g in stacks])
    floor = newton_schulz_flops([g.shape[-2:] for g in stacks for _ in range(len(g))]) / batched_matmul_peak(
        repeats, ns_dtype
    )
    opt.zero_grad()
    moes = model.moe_layers()
    groups = {
        "attention": model.attention_layers(),
        "moe": moes,
        "experts": [m.experts for m in moes],
        "shared": [m.shared_experts for m in moes if m.shared_experts is not None],
    }
    spent = [forward_seconds(groups, lambda: model(x, y)) for _ in range(repeats)]
    part = {k: statistics.median(s[k] for s in spent) * 1e3 for k in groups}
    return {
        "forward (with max-logit recording)": forward,
        "  of which attention (MLA)": part["attention"],
        "  of which MoE routing and dispatch": part["moe"] - part["experts"] - part["shared"],
        "  of which routed-expert GEMMs": part["experts"],
        "  of which shared experts": part["shared"],
        "  of which max-logit recording (QK-Clip)": forward - unrecorded,
        "backward": backward,
        "optimizer step (Muon + AdamW + QK-Clip)": optimizer,
        "  of which Newton-Schulz": newton_schulz,
        NS_FLOOR: floor * 1e3,
    }


def bench_step(args):
    """ms per training step for nanoKimi (MuonClip, AdamW) and the nanoGPT baseline (AdamW) at each batch shape,
    interleaved rounds, medians; and where nanoKimi's MuonClip step goes."""
    longest = max(t for _, t in args.shapes)
    kimi_config = make_config("kimi", PRESETS[args.preset], {"max_position_embeddings": longest, "dropout": 0.0})
    gpt_config = make_config("gpt", BASELINE_PRESETS[args.baseline], {"n_positions": longest, "dropout": 0.0})
    most = max(b * t for b, t in args.shapes)  # the largest batch, refused before any model is built
    fix = "pick a smaller --preset or --baseline, or smaller --shapes"
    check_fits("kimi", kimi_config, "cpu", most, context=f"--preset={args.preset}", fix=fix)
    check_fits("gpt", gpt_config, "cpu", most, context=f"--baseline={args.baseline}", fix=fix)
    # Newton-Schulz's precision as the trainer chooses it (capability), and the other one forced, to show the choice
    chosen = configure_optimizer(Kimi(kimi_config), "muonclip").optimizers[-1]
    other = "bfloat16" if chosen.ns_dtype == torch.float32 else "float32"
    # Kimi Linear's layout at the preset's size: KDA layers with MLA (unrotated) every fourth, as `bench long-context`
    hybrid_config = dataclasses.replace(
        kimi_config, layer_types=hybrid_layers(kimi_config.num_hidden_layers), mla_use_nope=True
    )
    builds = {
        "nanoKimi + MuonClip": (Kimi, kimi_config, "muonclip", torch.float32, False, "auto"),
        HYBRID: (Kimi, hybrid_config, "muonclip", torch.float32, False, "auto"),
        f"nanoKimi + MuonClip, Newton-Schulz {other}": (Kimi, kimi_config, "muonclip", torch.float32, False, other),
        "nanoKimi + MuonClip, bf16 autocast": (Kimi, kimi_config, "muonclip", torch.bfloat16, False, "auto"),
        "nanoKimi + AdamW": (Kimi, kimi_config, "adamw", torch.float32, False, "auto"),
        "nanoGPT baseline + AdamW": (GPT, gpt_config, "adamw", torch.float32, False, "auto"),
    }
    if args.compile:
        builds["nanoKimi + MuonClip, torch.compile"] = (Kimi, kimi_config, "muonclip", torch.float32, True, "auto")
    rows, breakdown_rows, ratios, hybrid_ratios, compile_s, baseline_ms = [], {}, {}, {}, {}, {}
    for batch, block in args.shapes:
        x = torch.randint(0, kimi_config.vocab_size, (batch, block + 1))
        inputs, targets = x[:, :-1], x[:, 1:]
        contenders = {}
        for name, (cls, config, optimizer, dtype, compiled, muon_dtype) in builds.items():
            torch.manual_seed(0)
            model = cls(config).train()
            opt = configure_optimizer(model, optimizer, lr=1e-3, muon_dtype=muon_dtype)
            net = compile_model(model) if compiled else None
            contenders[name] = (model, opt, dtype, net)
            if compiled:  # the first step compiles (timed apart; a warm cache in later runs makes it shorter)
                compile_s[batch, block] = timings(
                    lambda: training_step(model, opt, inputs, targets, dtype, net), 1, warmup=0
                )[0]
        medians = interleaved_medians(
            {
                name: partial(training_step, model, opt, inputs, targets, dtype, net)
                for name, (model, opt, dtype, net) in contenders.items()
            },
            args.rounds,
            args.repeats,
        )
        base = statistics.median(medians["nanoGPT baseline + AdamW"])
        baseline_ms[batch, block] = base * 1e3
        for name, values in medians.items():
            ms = statistics.median(values)
            rows.append([f"{batch}x{block}", name, spread_ms(values), f"{batch * block / ms:.0f}", f"{ms / base:.2f}x"])
        kimi_ms = statistics.median(medians["nanoKimi + MuonClip"])
        ratios[batch, block] = kimi_ms / base
        hybrid_ratios[batch, block] = statistics.median(medians[HYBRID]) / kimi_ms
        breakdown_rows[batch, block] = step_breakdown(
            *contenders["nanoKimi + MuonClip"][:2], inputs, targets, args.repeats
        )
    parts = list(next(iter(breakdown_rows.values())))
    body = (
        f"One full training step (forward, backward, gradient clipping, optimizer, expert-bias update) on random "
        f"tokens, fp32 unless marked: `{args.preset}` and `{args.baseline}`, dropout 0. Each contender's median of "
        f"{args.repeats} steps, measured in {args.rounds} interleaved rounds; the table gives the median "
        f"(min..max) of the rounds. Unless marked, nanoKimi's Newton-Schulz runs in the precision the trainer "
        f"chooses on this machine by its capability: {chosen.precision()[len('Newton-Schulz ') :]}.\n\n"
        + table(["batch x block", "model + optimizer", "ms per step", "tokens/s", "vs baseline"], rows)
        + "\n\nWhere nanoKimi's MuonClip step goes (ms, medians of separate timings of each part, so they do "
        "not add up exactly to the step):\n\n"
        + table(
            ["part"] + [f"{b}x{t}" for b, t in breakdown_rows],
            [[p.replace("  ", "&nbsp;&nbsp;")] + [f"{bd[p]:.1f}" for bd in breakdown_rows.values()] for p in parts],
        )
        + (
            "\n\ntorch.compile's first step, which compiles (a warm cache from an earlier run shortens it), took "
            + ", ".join(f"{s:.1f} s at {b}x{t}" for (b, t), s in compile_s.items())
            + "."
            if compile_s
            else ""
        )
        + "\n\nGoal: nanoKimi + MuonClip <= 1.3x the baseline's step; measured "
        + ", ".join(f"{r:.2f}x at {b}x{t}" for (b, t), r in ratios.items())
        + ". Newton-Schulz's floor alone is "
        + ", ".join(
            f"{bd[NS_FLOOR] / baseline_ms[shape]:.0%} at {shape[0]}x{shape[1]}" for shape, bd in breakdown_rows.items()
        )
        + " of the baseline's whole step. Goal: the Kimi Linear hybrid <= 1.3x nanoKimi's (MLA) step; measured "
        + ", ".join(f"{r:.2f}x at {b}x{t}" for (b, t), r in hybrid_ratios.items())
        + "."
    )
    print(body)
    write_section(args.report, f"step-{hardware_kind()}", body, args.command)
