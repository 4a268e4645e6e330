import torch

from nanokimi.generation import sample_next


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
