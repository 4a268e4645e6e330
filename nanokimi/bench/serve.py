"""`nanokimi bench serve`: a served model's aggregate tokens/s and time to first token with 1, 4 and 16 concurrent
streaming clients, each burst the same requests, rounds interleaved; and whether each stream equals its request run
one at a time (temperature 0)."""

import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time

import httpx

from ..chat_template import chat_token_ids
from ..errors import UserError
from ..checkpoint import load_with_tokenizer
from .chat_tasks import conversations
from .report import hardware_kind, table, write_section


class ServerProcess:
    """`nanokimi serve CHECKPOINT --slots=N` on a free port, in its own process (its own cores' worth of threads)."""

    def __init__(self, checkpoint, slots, device, threads=None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "nanokimi", "serve", str(checkpoint), f"--port={port}", f"--slots={slots}"]
        command += [f"--device={device}"] + ([f"--threads={threads}"] if threads else [])
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"the server did not start: {self.proc.stderr.read().strip()}")
            try:
                self.name = httpx.get(self.url + "/health").json()["model"]
                return
            except httpx.TransportError:
                if time.time() > deadline:
                    raise UserError("the server did not answer in 300 s") from None
                time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def requests_for(checkpoint, count, max_tokens):
    """(endpoint, body) of `count` requests: held-out conversations' first user turns (tools declared) for a chat
    model, text prompts drawn from its vocabulary for a base model; greedy, streamed, usage included."""
    _, tokenizer = load_with_tokenizer(checkpoint, "cpu")
    common = {"temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    try:
        chat_token_ids(tokenizer)
    except UserError:  # a base model
        rng = random.Random(0)
        prompts = [tokenizer.decode([rng.randrange(tokenizer.vocab_size) for _ in range(8)]) for _ in range(count)]
        return "/v1/completions", [common | {"prompt": p} for p in prompts], "completions of 8 random tokens"
    bodies = [common | {"messages": c["messages"][:1], "tools": c["tools"]} for c in conversations(count, seed=1)]
    return "/v1/chat/completions", bodies, "the first user turns of held-out chat_tasks.py conversations (seed 1)"


def stream(http, url, body):
    """One streamed request -> (seconds to its first event, completion tokens, its text and tool-call arguments)."""
    start, first, tokens, text = time.perf_counter(), None, 0, []
    with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise UserError(f"the server answered {response.status_code}: {response.read().decode()[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = time.perf_counter() - start if first is None else first
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise UserError(f"the server failed a request: {chunk['error']['message']}")
            tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
            for choice in chunk["choices"]:
                delta = choice.get("delta", choice)
                text.append(delta.get("content") or delta.get("text") or "")
                text += [call["function"]["arguments"] for call in delta.get("tool_calls") or []]
    return first, tokens, "".join(text)


def burst(server, endpoint, bodies, clients):
    """Every request of `bodies`, `clients` at a time -> (seconds, [(first-event seconds, tokens, text)] in order)."""
    results, next_index, lock = [None] * len(bodies), iter(range(len(bodies))), threading.Lock()

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                results[i] = stream(http, server.url + endpoint, bodies[i] | {"model": server.name})

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if None in results:
        raise UserError("a client failed (see above)")
    return time.perf_counter() - start, results


def bench_serve(args):
    endpoint, bodies, what = requests_for(args.checkpoint, args.requests, args.max_tokens)
    server = ServerProcess(args.checkpoint, max(args.clients), args.device, args.threads)
    threads = re.search(r"(\d+) CPU threads", server.proc.stderr.readline())[1]  # its first line says
    try:
        burst(server, endpoint, bodies[:2], 2)  # warm-up
        rates, firsts, texts = {c: [] for c in args.clients}, {c: [] for c in args.clients}, {}
        for _ in range(args.rounds):  # interleaved: the machine's drift falls on every row alike
            for clients in args.clients:
                seconds, results = burst(server, endpoint, bodies, clients)
                rates[clients].append(sum(tokens for _, tokens, _ in results) / seconds)
                firsts[clients] += [first for first, _, _ in results]
                texts.setdefault(clients, []).append([text for _, _, text in results])
    finally:
        server.close()
    alone = texts[min(args.clients)][0]
    rows = []
    for clients in args.clients:
        equal = sum(a == b for run in texts[clients] for a, b in zip(alone, run))
        rate = statistics.median(rates[clients])
        p50, p95 = (statistics.quantiles(firsts[clients], n=100)[q] for q in (49, 94))
        rows.append(
            [
                clients,
                f"{rate:.1f}",
                f"{rate / statistics.median(rates[min(args.clients)]):.2f}x",
                f"{1000 * p50:.0f}",
                f"{1000 * p95:.0f}",
                f"{equal}/{len(texts[clients]) * len(alone)}",
            ]
        )
    body = (
        f"`nanokimi serve {args.checkpoint}` (its own process, {max(args.clients)} slots, {threads} torch "
        f"threads{'' if args.threads else ': its default'}) answering {args.requests} "
        f"streamed requests per burst: {what}, greedy, up to {args.max_tokens} tokens each; clients are threads of "
        f"the benchmark's process on the same machine, each sending its next request when one ends. Each row: "
        f"median over {args.rounds} rounds (rows interleaved) of completion tokens / the burst's wall time; time to "
        f"the first event of each request (p50, p95 over all rounds); streams equal to the one-at-a-time run's "
        f"(character for character).\n\n"
        + table(["clients", "tokens/s", "vs one at a time", "first token p50 ms", "p95 ms", "streams equal"], rows)
    )
    print(body)
    write_section(args.report, f"serve-{hardware_kind(args.device)}", body, args.command)
