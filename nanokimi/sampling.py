"""Token sampling shared by nanoKimi and the nanoGPT baseline: temperature, top-k, top-p, greedy; and the check of
those settings that `sample`, `chat` and `serve` share."""

import torch

from .errors import UserError

MIN_TEMPERATURE = 1e-3


def check_sampling(temperature, top_k, top_p, seed, max_new_tokens, seeds=1):
    """A UserError for sampling settings out of range (`sample`'s and `chat`'s)."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 1e4):
        raise UserError(
            f"--temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and 1e4 (lower ones overflow "
            f"the probabilities), got {temperature}"
        )
    if (top_k is not None and top_k <= 0) or (top_p is not None and not 0 < top_p <= 1):
        raise UserError("need top_k > 0 and 0 < top_p <= 1")
    if max_new_tokens < 0:
        raise UserError("need max_new_tokens >= 0")
    if not 0 <= seed < 2**63 - seeds + 1:  # torch's generator seeds are 64-bit; sample i uses seed + i
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: [B, vocab] -> next token ids [B, 1]. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()  # on the generator function itself: torch then applies it to every step of the iteration
def generate_tokens(
    model, idx, max_new_tokens, max_context, temperature=1.0, top_k=None, top_p=None, generator=None, make_cache=None
):
    """Yield max_new_tokens tokens [B, 1] sampled after idx [B, T].

    Without make_cache (the nanoGPT way) every step recomputes the context cropped to max_context. With it, the
    prompt is prefilled into a cache once and each step feeds one token; when the cache is full, the newest half of
    the context is prefilled again from position 0 (positions beyond max_context were never trained)."""
    if make_cache is None:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -max_context:])
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, token], dim=1)
            yield token
        return
    context = idx[:, -max_context:]
    cache_len = min(max_context, context.shape[1] + max_new_tokens)
    cache = make_cache(idx.shape[0], cache_len)
    logits, _ = model(context, cache=cache, start_pos=0)
    pos = context.shape[1]
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        yield token
        if step == max_new_tokens - 1:
            return
        context = torch.cat([context, token], dim=1)
        if pos == cache_len:  # cache full: keep the newest half and prefill it again
            context = context[:, -(cache_len // 2) :]
            logits, _ = model(context, cache=cache, start_pos=0)
            pos = context.shape[1]
        else:
            logits, _ = model(token, cache=cache, start_pos=pos)
            pos += 1
