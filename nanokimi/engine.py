"""Batched decoding, the one loop behind `nanokimi serve` and `nanokimi chat`: sequences of different lengths decode
together, one forward per step over all of them, each in its own row of one preallocated cache (MLA's latents, KDA's
states). Requests join and leave between steps; a new one is prefilled alone into a free row, reusing the longest
prefix a finished sequence left there (a conversation's next turn reads only its new tokens).

Rows 0..n-1 hold the n sequences decoding (the model reads rows [:B] of each cache); a row that finishes swaps with
the last one, its tokens kept for the next request that starts with them."""

import sys
import threading
import traceback
from collections import deque

import torch

from .sampling import sample_next


class QueueFull(Exception):
    """More requests waiting than the engine keeps: the caller answers "busy" (HTTP 429)."""


class Request:
    """One sequence to continue: its prompt ids, how to sample, when to stop. The engine calls on_token(id) for each
    sampled token, then on_finish(reason) once: "stop" (a stop id was sampled; it is the last token), "length"
    (max_new_tokens), "cancelled" (cancel() was called), "error" (the forward failed; the engine logs it)."""

    def __init__(
        self,
        prompt,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        seed=None,
        stop_ids=(),
        on_token=None,
        on_finish=None,
        generator=None,
    ):
        self.prompt, self.max_new_tokens, self.stop_ids = list(prompt), max_new_tokens, frozenset(stop_ids)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self.on_token, self.on_finish = on_token, on_finish
        self.tokens = []  # sampled so far
        self.dropped = 0  # tokens dropped from the front when the sequence outgrew the context
        self.read = 0  # tokens the model read for it (prefill and decoding)
        self.finish_reason = None
        self.cancelled = False
        self.generator = generator  # or one seeded with `seed` (None: a random seed) when the request starts

    def cancel(self):
        """Stop it at the next step (from any thread); its row is freed then."""
        self.cancelled = True

    @property
    def done(self):
        return self.finish_reason is not None


class Engine:
    """Decodes up to `slots` requests at once on `model`; up to `max_waiting` more wait in line (QueueFull past it).

    `run(request)` runs one request to its end in the caller's thread (`nanokimi chat`); `start()` runs a thread that
    serves `submit`ted ones until `stop()` (`nanokimi serve`). With use_cache=False (or a model without one, the
    nanoGPT baseline), each step reads every sequence whole instead."""

    def __init__(self, model, slots=16, max_waiting=64, use_cache=True):
        self.model, self.slots, self.max_waiting = model, slots, max_waiting
        self.context = model.context_length
        self.device = model.lm_head.weight.device
        self.cache = model.make_cache(slots, self.context) if use_cache and model.has_kv_cache else None
        self.rows = [[] for _ in range(slots)]  # the ids each row's cache holds: positions 0..len - 1
        self.active = []  # the requests decoding, request i in row i
        self.waiting = deque()
        self.changed = threading.Condition()
        self.thread, self.stopping = None, False

    # ---- the queue ----

    def submit(self, request):
        with self.changed:
            if self.stopping:
                raise QueueFull("the engine is stopping")
            if len(self.waiting) >= self.max_waiting + self.slots - len(self.active):  # no free row, the line full
                raise QueueFull(f"{len(self.active)} requests decoding, {len(self.waiting)} waiting")
            self.waiting.append(request)
            self.changed.notify()

    def run(self, request):
        """Submit `request` and step until it is done (in this thread); returns its tokens."""
        self.submit(request)
        while not request.done:
            self.step()
        return request.tokens

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, name="nanokimi-engine", daemon=True)
        self.thread.start()

    def stop(self, wait=True, timeout=10.0):
        """Cancel every request: the thread finishes the step in flight, ends them (on_finish "cancelled") and
        returns. With wait, until it has."""
        with self.changed:
            self.stopping = True
            for request in [*self.waiting, *self.active]:
                request.cancel()
            self.changed.notify()
        if wait and self.thread is not None:
            self.thread.join(timeout)

    def serve_forever(self):
        while True:
            with self.changed:
                while not (self.stopping or self.waiting or self.active):
                    self.changed.wait()
                if self.stopping and not (self.waiting or self.active):
                    return
            self.step()

    # ---- one step ----

    @torch.no_grad()
    def step(self):
        """Drop cancelled requests, decode one token for every active one in one forward, then start waiting ones in
        the free rows (each prefilled alone, its first token sampled: it joins the next step's forward)."""
        try:
            for i in reversed(range(len(self.active))):
                if self.active[i].cancelled:
                    self.finish(i, "cancelled")
            if self.active:
                self.decode()
            while len(self.active) < self.slots:
                with self.changed:
                    if not self.waiting:
                        break
                    request = self.waiting.popleft()
                if request.cancelled:
                    self.finished(request, "cancelled")
                else:
                    self.begin(request)
        except Exception:  # a failed forward: end what it touched, keep serving the rest
            traceback.print_exc(file=sys.stderr)
            self.abort("error")

    def abort(self, reason="cancelled"):
        """End the active requests now, their rows forgotten (a forward cut short may have half-written them)."""
        for i in reversed(range(len(self.active))):
            self.rows[i] = []
            self.finish(i, reason)

    def begin(self, request):
        """Put `request` in the free row whose tokens share the longest prefix with its prompt, prefill the rest,
        sample its first token."""
        n, prompt = len(self.active), request.prompt
        self.swap(n, max(range(n, self.slots), key=lambda r: common_prefix(self.rows[r], prompt)))
        self.active.append(request)
        if request.generator is None:
            request.generator = torch.Generator(self.device)
            request.generator.manual_seed(torch.seed() if request.seed is None else request.seed)
        reused = min(common_prefix(self.rows[n], prompt), len(prompt) - 1)  # at least one token gives the logits
        self.rows[n] = self.rows[n][:reused]
        if self.sample(n, self.feed(n, self.fit(n, prompt[reused:]))):
            self.finish(n, self.active[n].finish_reason)

    def decode(self):
        """Feed every active request its last sampled token and sample the next: one forward over rows [0, n)."""
        n = len(self.active)
        if self.cache is None:
            logits = torch.cat([self.feed(i, self.fit(i, [r.tokens[-1]])) for i, r in enumerate(self.active)])
        else:
            for i, request in enumerate(self.active):
                new = self.fit(i, [request.tokens[-1]])
                if len(new) > 1:  # no room was left: the newest half, read again; its last token joins the batch
                    self.feed(i, new[:-1])
            tokens = torch.tensor([[r.tokens[-1]] for r in self.active], device=self.device)  # [n, 1]
            starts = [len(row) for row in self.rows[:n]]  # each row's own position; one row: the scalar path
            starts = starts[0] if n == 1 else torch.tensor(starts, device=self.device)  # (no mask, as chat had)
            logits = self.model(tokens, cache=self.cache, start_pos=starts)[0][:, -1]  # [n, vocab]
            for i, request in enumerate(self.active):
                self.rows[i].append(request.tokens[-1])
                request.read += 1
        done = [i for i in range(n) if self.sample(i, logits[i : i + 1])]
        for i in reversed(done):
            self.finish(i, self.active[i].finish_reason)

    def fit(self, i, new):
        """The tokens to feed row i so that `new` follows what it holds: `new`, or, with no room left in the context,
        the newest half of all its tokens, read again from position 0 (positions past the context were never
        trained)."""
        ids = self.rows[i] + new
        if len(ids) <= self.context:
            return new
        keep = self.context // 2
        self.active[i].dropped += len(ids) - keep
        self.rows[i] = []
        return ids[-keep:]

    def feed(self, i, new):
        """Row i reads the tokens `new` after what it holds -> the logits [1, vocab] after the last."""
        start = len(self.rows[i])
        self.rows[i] = self.rows[i] + new
        if self.cache is None:  # the nanoGPT way: the whole sequence, every step
            self.active[i].read += len(self.rows[i])
            return self.model(torch.tensor([self.rows[i]], device=self.device))[0][:, -1]
        self.active[i].read += len(new)
        row = [row_view(layer, i) for layer in self.cache]
        return self.model(torch.tensor([new], device=self.device), cache=row, start_pos=start)[0][:, -1]

    def sample(self, i, logits):
        """Sample row i's next token from logits [1, vocab]; True when that ends the request (finish_reason set,
        not yet finished)."""
        request = self.active[i]
        token = int(sample_next(logits, generator=request.generator, **request.sampling))
        request.tokens.append(token)
        if request.on_token is not None:
            request.on_token(token)
        if token in request.stop_ids:
            request.finish_reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            request.finish_reason = "length"
        return request.finish_reason is not None

    def finish(self, i, reason):
        """End the request in row i; the last active row takes its place (rows [:n] stay the active ones)."""
        request = self.active[i]
        last = len(self.active) - 1
        self.swap(i, last)
        self.active[i], self.active[last] = self.active[last], self.active[i]
        self.active.pop()
        self.finished(request, reason)

    @staticmethod
    def finished(request, reason):
        request.finish_reason = reason  # done: on_finish may see it so
        if request.on_finish is not None:
            request.on_finish(reason)

    def swap(self, a, b):
        """Swap rows a and b: their tokens and every layer's cache rows."""
        if a == b:
            return
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        for layer in self.cache or ():
            for name in layer.ROWS:
                t = getattr(layer, name)
                t[[a, b]] = t[[b, a]]


def row_view(cache, i):
    """A layer's cache seen as a batch of one: row i of each of its tensors (views, written through)."""
    view = object.__new__(type(cache))
    view.__dict__.update(cache.__dict__)
    for name in cache.ROWS:
        setattr(view, name, getattr(cache, name)[i : i + 1])
    return view


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
