import torch

from nanokimi.sampling import sample_next


def test_greedy_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample_next(logits, temperature=0).item() == 1
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_k=2, generator=gen).item() for _ in range(200)}
    assert draws == {1, 2}
    # top_p keeps the smallest prefix whose probability reaches p: here only token 1
    assert {sample_next(logits, top_p=0.4, generator=gen).item() for _ in range(50)} == {1}


def test_streaming_builds_no_autograd_graph():
    from nanokimi import Kimi
    from tests.conftest import tiny_config

    model = Kimi(tiny_config())
    grad_modes = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    model.forward = recording_forward
    for use_cache in (True, False):
        list(model.stream(torch.randint(0, 50, (1, 4)), 3, use_cache=use_cache))
    assert len(grad_modes) == 6 and not any(grad_modes)


def test_tokens_printed_one_by_one_spell_the_decoded_text():
    # a BPE token may end inside a UTF-8 character: the stream holds it back until the character is whole
    from nanokimi.tokenizer import CharTokenizer, HFTokenizer

    text = "naïve café, 日本語 and ÿ🙂 — " * 20
    bpe = HFTokenizer.train(iter(["plain ascii words " * 20]), vocab_size=300, boundary=True)  # no merges of them
    ids = bpe.encode(text)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # some tokens are parts of a character
    text_of = bpe.stream()
    pieces = [text_of(i) for i in ids]
    assert "".join(pieces) == bpe.decode(ids) == text and "\ufffd" not in "".join(pieces)
    chars = CharTokenizer.train(set(text), boundary=True)
    text_of = chars.stream()
    assert "".join(text_of(i) for i in chars.encode(text)) == text
