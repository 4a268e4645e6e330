"""`nanokimi bench chat`: how well a chat run answers held-out conversations of chat_tasks.py, by exact match."""

import io
import json
import time
from pathlib import Path

from ..chat import Chat
from ..checkpoint import Checkpoint, load_with_tokenizer
from .chat_tasks import conversations
from .report import hardware_kind, table, write_section


def replay(model, tokenizer, conversation, tools):
    """The assistant's last reply when the conversation's user turns are said to `model` (greedy), one by one."""
    chat = Chat(model, tokenizer, tools=tools, temperature=0, max_new_tokens=96, out=io.StringIO(), log=io.StringIO())
    reply = None
    for message in conversation["messages"]:
        if message["role"] == "user":
            reply = chat.say(message["content"])
    return reply.get("content", "")


def bench_chat(args):
    model, tokenizer = load_with_tokenizer(args.checkpoint, "cpu")
    held_out = conversations(args.conversations, args.seed)
    scores = {}  # row name -> [exact matches, conversations, seconds]
    for conversation in held_out:
        expected = conversation["messages"][-1]["content"]
        for tools in (["calculator"], []) if conversation["kind"] == "tool" else (["calculator"],):
            t0 = time.perf_counter()
            right = replay(model, tokenizer, conversation, tools).strip() == expected
            seconds = time.perf_counter() - t0
            kind = {("tool", True): "arithmetic, calculator on", ("tool", False): "arithmetic, calculator off"}.get(
                (conversation["kind"], bool(tools)), "plain turns (no tool needed)"
            )
            for name in (kind, f"- {conversation['task']}") if conversation["kind"] == "plain" else (kind,):
                score = scores.setdefault(name, [0, 0, 0.0])
                score[0], score[1], score[2] = score[0] + right, score[1] + 1, score[2] + seconds
    order = ["arithmetic, calculator on", "arithmetic, calculator off", "plain turns (no tool needed)"]
    rows = [
        [name, f"{right}/{total}", f"{100 * right / total:.1f}%", f"{seconds / total:.2f}"]
        for name, (right, total, seconds) in sorted(
            scores.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 2.5, kv[0])
        )
    ]
    summary = training_summary(args.checkpoint)
    body = (
        f"Run `{args.checkpoint}` ({summary}; the recipe in docs/chat.md: `nanokimi train chat-arithmetic-cpu`). "
        f"{args.conversations} held-out conversations of "
        f"`nanokimi/bench/chat_tasks.py` (seed {args.seed}; the training data is seed 0), each replayed turn by "
        f"turn through `nanokimi chat` (greedy), its last reply compared with the expected one, character for "
        f"character. Arithmetic: 2- to 5-digit + and -, 2- to 4-digit *; the calculator off means no tool is "
        f"declared and the model must answer alone.\n\n"
        + table(["conversations", "exact", "accuracy", "s per conversation"], rows)
    )
    print(body)
    write_section(args.report, f"chat-{hardware_kind()}", body, args.command)


def training_summary(run):
    """How the run was trained, from its checkpoint's settings and metrics.jsonl's summary."""
    settings = Checkpoint(run).train_config or {}
    trained = (
        f"trained on {settings.get('data')}, batch {settings.get('batch_size')} x {settings.get('block_size')}"
        f", {settings.get('optimizer')}, lr {settings.get('lr')}"
    )
    try:
        summary = [
            json.loads(line)["summary"]
            for line in (Path(run) / "metrics.jsonl").read_text().splitlines()
            if '"summary"' in line
        ][-1]
    except (OSError, IndexError, ValueError, KeyError):
        return f"{trained}; no training summary found"
    return (
        f"{trained}: {summary['step']} steps, {summary['train_time_s']} s of training, val loss "
        f"{summary['val_loss']:.4f} on the assistant's tokens"
    )
