"""The batched decoding engine (engine.py): sequences of different lengths in one forward give what each gives alone,
rows join and leave between steps, a finished row's tokens are reused, and the threaded loop serves and stops."""

import threading

import pytest
import torch

from nanokimi import Kimi
from nanokimi.engine import Engine, QueueFull, Request, row_view
from tests.conftest import LOGIT_TOLERANCE, assert_greedy, tiny_config
from tests.test_kda import HYBRID

MODELS = {"mla": {}, "hybrid": HYBRID, "mha": {"attention": "mha"}}


@pytest.mark.parametrize("kind", MODELS)
def test_per_row_positions_in_one_forward_match_each_row_alone(kind):
    """The seam the engine decodes through: rows at different positions, one forward, each row's logits as its own
    cached decoding gives them."""
    model = Kimi(tiny_config(**MODELS[kind])).eval()
    lengths = [5, 17, 9]
    seqs = [torch.randint(0, 50, (1, n + 1)) for n in lengths]
    alone = []
    for seq, n in zip(seqs, lengths):
        cache = model.make_cache(1, 32)
        model(seq[:, :n], cache=cache, start_pos=0)
        alone.append(model(seq[:, n:], cache=cache, start_pos=n)[0])
    cache = model.make_cache(len(seqs), 32)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):  # each prefilled into its own row
        row = [row_view(c, i) for c in cache]
        model(seq[:, :n], cache=row, start_pos=0)
    tokens = torch.cat([seq[:, n:] for seq, n in zip(seqs, lengths)])  # [3, 1]
    batched, _ = model(tokens, cache=cache, start_pos=torch.tensor(lengths))
    torch.testing.assert_close(batched, torch.cat(alone), atol=LOGIT_TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_concurrent_requests_decode_greedily_each_as_alone(kind):
    """Five prompts through four rows (one waits for a free row), three of them past the context (the newest half is
    read again): each request's tokens are greedy under the model fed its own window alone, and the rows are free
    after."""
    context = 40
    model = Kimi(tiny_config(**MODELS[kind], max_position_embeddings=context)).eval()
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in (3, 11, 1, 20, 7)]
    engine = Engine(model, slots=4)
    requests = [Request(p, 30, temperature=0) for p in prompts]
    for r in requests:
        engine.submit(r)
    steps = 0
    while not all(r.done for r in requests):
        engine.step()
        steps += 1
    assert steps < sum(r.max_new_tokens for r in requests) // 2  # decoded together, not one after another
    assert engine.active == [] and not engine.waiting
    assert [r.dropped > 0 for r in requests] == [len(p) + 29 > context for p in prompts]
    for prompt, request in zip(prompts, requests):
        assert request.finish_reason == "length" and len(request.tokens) == 30
        logits = windowed_logits(model, prompt + request.tokens, len(prompt), context)
        assert_greedy(torch.tensor([request.tokens]), logits)


def windowed_logits(model, seq, start, context):
    """The logits [1, N, vocab] before each of seq[start:], each from the window the engine reads: from position 0
    until the context is full, then the newest half of what it holds, growing again."""
    first, out = 0, []
    with torch.no_grad():
        for t in range(start, len(seq)):
            if t - first > context:
                first = t - context // 2
            out.append(model(torch.tensor([seq[first:t]]))[0][:, -1])
    return torch.stack(out, 1)


def test_sampling_is_per_request_and_reproducible_by_seed():
    model = Kimi(tiny_config()).eval()
    engine = Engine(model, slots=3)
    requests = [Request([1, 2, 3], 12, temperature=1.0, seed=seed) for seed in (7, 7, 8)]
    for r in requests:
        engine.submit(r)
    while not all(r.done for r in requests):
        engine.step()
    assert requests[0].tokens == requests[1].tokens != requests[2].tokens
    assert Engine(model, slots=1).run(Request([1, 2, 3], 12, temperature=1.0, seed=7)) == requests[0].tokens


def test_a_stop_id_ends_a_request_and_a_finished_row_is_reused_by_the_next_turn():
    model = Kimi(tiny_config()).eval()
    engine = Engine(model, slots=2)
    tokens = engine.run(Request([5, 6, 7], 10, temperature=0))
    # the next turn starts with the whole first sequence: only its new tokens are read
    turn = Request([5, 6, 7, *tokens, 9, 9], 4, temperature=0)
    engine.run(turn)
    assert turn.read == 1 + 2 + 3  # the last sampled token (never fed), the two new ones, then three decode steps
    assert turn.tokens == Engine(model, slots=1).run(Request(turn.prompt, 4, temperature=0))
    stop = tokens[3]
    stopped = Request([5, 6, 7], 10, temperature=0, stop_ids=[stop])
    assert engine.run(stopped) == tokens[: tokens.index(stop) + 1] and stopped.finish_reason == "stop"


def test_the_thread_serves_cancels_and_stops():
    model = Kimi(tiny_config()).eval()
    engine = Engine(model, slots=1, max_waiting=1)
    engine.start()
    started, finished = threading.Event(), threading.Event()
    running = Request(
        [1, 2], 10_000, temperature=0, on_token=lambda t: started.set(), on_finish=lambda r: finished.set()
    )
    engine.submit(running)
    assert started.wait(10)  # it holds the one row
    second_done = threading.Event()
    engine.submit(Request([3], 5, temperature=0, on_finish=lambda reason: second_done.set()))  # waits for the row
    with pytest.raises(QueueFull):
        engine.submit(Request([4], 5, temperature=0))  # past max_waiting
    running.cancel()
    assert finished.wait(10) and running.finish_reason == "cancelled"
    assert second_done.wait(10)
    long = Request([1], 10_000, temperature=0)
    engine.submit(long)
    engine.stop()
    assert not engine.thread.is_alive() and long.finish_reason == "cancelled"
