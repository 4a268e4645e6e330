"""talk to a chat model (finetuned with prepare chat + train)

Chat with a model finetuned on conversations (Kimi-K2's chat template). Interactive on a terminal (/reset starts over,
/exit or Ctrl-D ends; Ctrl-C stops a reply); with -m, or with a pipe on stdin (one message per line), one conversation
whose replies alone go to stdout, one line each."""

import sys

from ..errors import UserError
from . import add_checkpoint_arguments

NAME = "chat"
KEYS = "/reset starts over, /exit (or Ctrl-D) ends; Ctrl-C stops a reply"


def add_arguments(p):
    add_checkpoint_arguments(p)
    p.add_argument(
        "-m",
        "--message",
        action="append",
        help="a user message (repeatable: the turns of one conversation); no interactive session",
    )
    p.add_argument("--system", help="a system prompt (default: Kimi's own, as the template writes it)")
    p.add_argument(
        "--tools",
        nargs="+",
        default=[],
        choices=["calculator"],
        help="tools the model may call, run here (calculator: exact arithmetic)",
    )
    p.add_argument("--max_new_tokens", type=int, default=512, help="per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, as Kimi-K2)")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole conversation every token")


def run(args):
    from ..chat import Chat
    from ..checkpoint import load_with_tokenizer
    from ..sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.seed, args.max_new_tokens)
    if args.max_new_tokens == 0:
        raise UserError("--max_new_tokens must be at least 1: a reply needs a token")
    model, tokenizer = load_with_tokenizer(args.checkpoint, args.device)
    chat = Chat(
        model,
        tokenizer,
        args.system,
        args.tools,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.max_new_tokens,
        not args.no_cache,
    )
    if args.message:
        for text in args.message:
            chat.say(text)
    elif not sys.stdin.isatty():
        for line in sys.stdin:
            if line.strip():
                chat.say(line.rstrip("\n"))
    else:
        interact(chat)


def interact(chat):
    print(f"chatting with {chat.model.__class__.__name__}: {KEYS}", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D ends the chat)", file=sys.stderr)
            continue
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            chat.reset()
            print("(a new conversation)", file=sys.stderr)
        elif text.strip():
            try:
                chat.say(text)
            except UserError as e:  # a character the model's vocabulary lacks: say it, and go on
                print(f"error: {e}", file=sys.stderr)
