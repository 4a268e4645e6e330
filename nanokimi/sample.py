"""`nanokimi sample`: text from a checkpoint, streamed token by token as it is generated."""

import sys

import torch

from .checkpoint import load_with_tokenizer
from .errors import UserError
from .sampling import check_sampling


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
