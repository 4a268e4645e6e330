"""serve a model over OpenAI's API (and a chat page at /)

Serve a checkpoint over OpenAI's API: /v1/chat/completions (chat models), /v1/completions, /v1/models, /health, and
a chat page at /. Concurrent requests decode together, one forward per step (engine.py). Ctrl-C or SIGTERM ends the
streams in flight and exits."""

import sys

from ..errors import UserError
from . import add_checkpoint_arguments

NAME = "serve"


def add_arguments(p):
    add_checkpoint_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", help="require `Authorization: Bearer KEY` on /v1/ (default: none required)")
    p.add_argument("--name", help="the model's id in the API (default: the run folder's name)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded at once (default 16)")
    p.add_argument("--max_waiting", type=int, default=64, help="requests waiting past the slots before 429s")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: every core torch would use but one, which the HTTP side keeps: on 2 "
        "cores 1 thread served 1.9-2.4x the tokens/s of 2, BENCHMARKS.md)",
    )


def run(args):
    if args.slots < 1 or args.max_waiting < 0:
        raise UserError("need --slots >= 1 and --max_waiting >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn

        from ..server import APIKey, BodyLimit, Served, build_app
    except ImportError as e:
        missing = f"serving needs FastAPI and uvicorn ({e.name} is missing)"
        raise UserError(f"{missing}: pip install 'nanokimi[serve]'") from None
    from ..checkpoint import load_with_tokenizer, resolve
    from ..engine import Engine

    import torch

    # the engine's forwards and the HTTP side's event loop share the cores: torch's threads spin between ops, and on
    # a small CPU a core left to the event loop serves more tokens than a core more for the matmuls
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    model, tokenizer = load_with_tokenizer(args.checkpoint, args.device)
    folder = resolve(args.checkpoint)
    name = args.name or (folder.parent.name if folder.name == "checkpoint" else folder.name)
    engine = Engine(model, slots=args.slots, max_waiting=args.max_waiting)
    served = Served(tokenizer, name, engine)
    app = build_app(served)
    if args.api_key:
        app = APIKey(app, args.api_key)
    app = BodyLimit(app)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C / SIGTERM: end the streams in flight now, then shut down
            engine.stop(wait=False)
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    )
    kind = "chat" if served.special is not None else "base (no chat template: /v1/completions only)"
    where = f"http://{args.host}:{args.port}"
    print(
        f"serving {name} ({kind} model, {engine.slots} slots, context {engine.context}, {torch.get_num_threads()} "
        f"CPU threads) at {where}",
        file=sys.stderr,
    )
    print(f"  chat page: {where}/   OpenAI API: {where}/v1   (Ctrl-C stops)", file=sys.stderr, flush=True)
    server.run()
    if not server.started:
        raise UserError(f"could not listen on {args.host}:{args.port} (in use? pick another --port)")
