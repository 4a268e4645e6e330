"""`nanokimi bench long-context`: what grows with the context and what stays flat, for MLA everywhere (Kimi-K2's
layout), the Kimi Linear hybrid (3 KDA layers : 1 MLA) and the MHA ablation: prefill time, decode tokens/s, peak
memory and cache bytes, plus the cache of the real Kimi-K2-style MLA and Kimi-Linear-48B-A3B layouts at 1M tokens."""

import statistics

import torch

from ..model import attention_kind
from ..models import PRESETS, build_model, make_config
from .report import hardware_kind, table, write_section
from .speed import cache_nbytes, decode_timing, hybrid_layers, peak_memory


def cache_bytes(config, length, kind=None):
    """Bytes of the fp32 inference caches for one sequence of `length` tokens, every layer's (kind: only the layers
    of that layer_type, e.g. "linear_attention"), read off the cache classes built on the meta device (no memory)."""
    return sum(
        cache_nbytes(attention_kind(config, i).cache(config, 1, length, "meta", torch.float32))
        for i in range(config.num_hidden_layers)
        if kind in (None, config.layer_type(i))
    )


def contenders(preset, layers, longest):
    """The three layouts at one size, random weights (speed and memory do not depend on them)."""
    base = {"num_hidden_layers": layers, "max_position_embeddings": longest, "dropout": 0.0}
    configs = {
        "MLA (Kimi-K2 layout)": base,
        "KDA hybrid 3:1 (Kimi Linear)": base | {"layer_types": hybrid_layers(layers), "mla_use_nope": True},
        "MHA ablation": base | {"attention": "mha"},
    }
    torch.manual_seed(0)
    return {
        name: build_model("kimi", make_config("kimi", PRESETS[preset], overrides), context=f"--preset={preset}").eval()
        for name, overrides in configs.items()
    }


def bench_long_context(args):
    longest = max(args.contexts) + args.new_tokens
    models = contenders(args.preset, args.layers, longest)
    rows, prefill, speed = [], {}, {}
    for context in args.contexts:
        prompt = torch.randint(0, next(iter(models.values())).config.vocab_size, (1, context))
        runs = {name: [] for name in models}
        for _ in range(args.rounds):  # interleaved: the shared machine's drift hits every layout alike
            for name, model in models.items():
                runs[name].append(decode_timing(model, prompt, args.new_tokens, use_cache=True))
        for name, model in models.items():
            prefill[name, context] = statistics.median(r[0] for r in runs[name])
            speed[name, context] = statistics.median(r[1] for r in runs[name])
            peak = peak_memory(model, prompt, 2, use_cache=True) if context <= args.memory_up_to else None
            length = context + args.new_tokens
            rows.append(
                [
                    context,
                    name,
                    f"{prefill[name, context]:.2f}",
                    f"{speed[name, context]:.0f}",
                    "-" if peak is None else f"{peak / 2**20:.0f}",
                    f"{cache_bytes(model.config, length) / 2**10:,.0f}",
                    f"{cache_bytes(model.config, length, 'linear_attention') / 2**10:,.0f}",
                ]
            )
    first, last = min(args.contexts), max(args.contexts)
    mla, kda, mha = models  # their names
    summary = [
        [
            name,
            f"{prefill[name, last] / prefill[name, first]:.1f}x",
            f"{speed[name, first] / speed[name, last]:.1f}x",
            f"{cache_bytes(m.config, last) / cache_bytes(m.config, first):.1f}x",
        ]
        for name, m in models.items()
    ]
    released = PRESETS["kimi-linear-48b-a3b"]
    real = {
        "Kimi-Linear-48B-A3B's sizes, MLA in every layer": make_config("kimi", released, {"layer_types": None}),
        "Kimi-Linear-48B-A3B as released (20 KDA + 7 MLA)": released,
    }
    million = {name: cache_bytes(config, 2**20) for name, config in real.items()}
    saved = 1 - million[list(real)[1]] / million[list(real)[0]]
    c = models[mla].config
    sizes = " / ".join(f"{m.num_params()['total'] / 1e6:.2f}M" for m in models.values())
    body = (
        f"Model: `{args.preset}` widths with {args.layers} layers (hidden {c.hidden_size}, MLA "
        f"{c.num_attention_heads} heads, KDA {c.linear_num_heads} heads of {c.linear_head_dim}), fp32, batch 1, "
        f"random weights; {sizes} parameters. Prefill = the prompt and the first token; "
        f"decode = the next {args.new_tokens - 1} tokens, one at a time over the caches. Medians of {args.rounds} "
        f"interleaved runs. Peak memory = live tensors during prefill and one decoded token (torch's MemTracker; "
        f"measured up to {args.memory_up_to:,} tokens, where it stops being quick). Cache = what "
        f"`make_cache` allocates (fp32), read off the tensors.\n\n"
        + table(
            ["context", "layout", "prefill s", "decode tokens/s", "peak MiB", "cache KiB", "of which KDA states KiB"],
            rows,
        )
        + f"\n\nGrowth from {first:,} to {last:,} tokens ({last // first}x the context):\n\n"
        + table(["layout", "prefill time", "decode time per token", "cache"], summary)
        + f"\n\nAt {last:,} tokens the hybrid decodes {speed[kda, last] / speed[mla, last]:.2f}x as fast as MLA "
        f"everywhere and prefills in {prefill[kda, last] / prefill[mla, last]:.2f}x its time. At each context "
        "(hybrid vs MLA: prefill time, decode speed): "
        + ", ".join(
            f"{n:,}: {prefill[kda, n] / prefill[mla, n]:.2f}x / {speed[kda, n] / speed[mla, n]:.2f}x"
            for n in args.contexts
        )
        + ".\n\n"
        "The real layouts at 1,048,576 tokens (cache as nanoKimi allocates it, fp32; GiB):\n\n"
        + table(["layout", "cache GiB"], [[name, f"{b / 2**30:.1f}"] for name, b in million.items()])
        + f'\n\nKimi Linear\'s 3:1 layout keeps {saved:.0%} less cache at 1M tokens (Moonshot: "up to 75%").'
    )
    print(body)
    write_section(args.report, f"long-context-{hardware_kind()}", body, args.command)
