"""`nanokimi bench chat`: how well a chat run answers held-out conversations of chat_tasks.py, by exact match."""

import io
import json
import time
from pathlib import Path

from ..chat import Chat
from ..sample import load_with_tokenizer
from .chat_tasks import conversations
from .report import hardware_kind, table, write_section


def replay(model, tokenizer, conversation, tools):
    """The assistant's last reply when the conversation's user turns are said to `model` (greedy), one by one."""
    chat = Chat(model, tokenizer, tools=tools, temperature=0, max_new_tokens=96, out=io.StringIO(),
                log=io.StringIO())
    reply = None
    for message in conversation["messages"]:
        if message["role"] == "user":
            reply = chat.say(message["content"])
    return reply.get("content", "")


def bench_chat(args):
    model, tokenizer = load_with_tokenizer(args.run, "cpu")
    held_out = conversations(args.conversations, args.seed)
    scores = {}  # (kind, tools on) -> [exact matches, conversations, seconds]
    for conversation in held_out:
        expected = conversation["messages"][-1]["content"]
        for tools in ((["calculator"], []) if conversation["kind"] == "tool" else (["calculator"],)):
            t0 = time.perf_counter()
            right = replay(model, tokenizer, conversation, tools).strip() == expected
            score = scores.setdefault((conversation["kind"], bool(tools)), [0, 0, 0.0])
            score[0], score[1], score[2] = score[0] + right, score[1] + 1, score[2] + time.perf_counter() - t0
    names = {("tool", True): "arithmetic, calculator on", ("tool", False): "arithmetic, calculator off",
             ("plain", True): "plain turns (no tool needed)"}
    rows = [[names[key], f"{right}/{total}", f"{100 * right / total:.1f}%", f"{seconds / total:.2f}"]
            for key, (right, total, seconds) in sorted(scores.items(), key=lambda kv: list(names).index(kv[0]))]
    summary = training_summary(args.run)
    body = (f"Run `{args.run}` ({summary}). {args.conversations} held-out conversations of "
            f"`nanokimi/bench/chat_tasks.py` (seed {args.seed}; the training data is seed 0), each replayed turn by "
            f"turn through `nanokimi chat` (greedy), its last reply compared with the expected one, character for "
            f"character. Arithmetic: 2- to 5-digit + and -, 2- to 4-digit *; the calculator off means no tool is "
            f"declared and the model must answer alone.\n\n"
            + table(["conversations", "exact", "accuracy", "s per conversation"], rows))
    print(body)
    write_section(args.report, f"chat-{hardware_kind()}", body, args.command)


def training_summary(run):
    """'N steps, S s of training' from a run's metrics.jsonl."""
    path = Path(run) / "metrics.jsonl"
    try:
        summary = [json.loads(line)["summary"] for line in path.read_text().splitlines() if '"summary"' in line][-1]
    except (OSError, IndexError, ValueError, KeyError):
        return "no training summary found"
    return (f"{summary['step']} steps, {summary['train_time_s']} s of training, val loss {summary['val_loss']:.4f} "
            f"on the assistant's tokens")
