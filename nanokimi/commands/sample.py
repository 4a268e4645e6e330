"""`nanokimi sample CHECKPOINT`: stream text from a checkpoint, token by token."""

import sys

import torch

from ..checkpoint import load_with_tokenizer
from ..errors import UserError
from ..sampling import check_sampling

NAME = "sample"


def add_parser(sub):
    p = sub.add_parser(
        NAME,
        help="generate text from a checkpoint",
        description="Stream samples from a checkpoint (a run's out_dir or its checkpoint folder).",
    )
    p.add_argument("checkpoint")
    p.add_argument("--prompt", help="text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (no MLA cache)")
    p.add_argument("--device", default="cpu")
    return p


def run(args):
    sample(
        args.checkpoint,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.num_samples,
        not args.no_cache,
        args.device,
    )


def sample(
    path,
    prompt=None,
    max_new_tokens=500,
    temperature=0.8,
    top_k=200,
    top_p=None,
    seed=1337,
    num_samples=1,
    use_cache=True,
    device="cpu",
    out=None,
):
    """Print num_samples continuations of prompt, token by token, to `out` (the current sys.stdout by default);
    returns them as strings."""
    out = out or sys.stdout
    if num_samples <= 0:
        raise UserError("need num_samples > 0")
    check_sampling(temperature, top_k, top_p, seed, max_new_tokens, num_samples)
    model, tokenizer = load_with_tokenizer(path, device)
    given = prompt is not None
    if not given:  # as nanoGPT: start from a newline
        prompt = "\n"
        if tokenizer.unknown(prompt):
            raise UserError("this model's vocabulary has no newline, the default prompt: pass --prompt=TEXT")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError(
            "the prompt is empty: pass --prompt=TEXT with at least one token"
            if given
            else "this model's tokenizer encodes a newline, the default prompt, to no token: pass --prompt=TEXT"
        )
    use_cache = use_cache and model.has_kv_cache
    texts = []
    for i in range(num_samples):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        idx = torch.tensor([ids], device=device)
        text_of, pieces = tokenizer.stream(ids), []
        out.write(prompt)
        for token in model.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
            pieces.append(text_of(token.item()))
            out.write(pieces[-1])
            out.flush()
        out.write("\n" + ("-" * 40 + "\n" if i < num_samples - 1 else ""))
        texts.append(prompt + "".join(pieces))
    return texts
