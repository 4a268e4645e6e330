"""Seeded conversations for the chat recipe (README, docs/chat.md) and its benchmark (`nanokimi bench chat`): exact
arithmetic on 2- to 5-digit numbers that the assistant answers through the calculator tool, and plain turns that need
no tool (greetings, repeating or capitalising a made-up word, who it is). Every conversation declares the calculator,
as `nanokimi chat --tools calculator` does, so the model learns when to call it and when not.

    python -m nanokimi.bench.chat_tasks --out data/chat_arithmetic.jsonl   # 20,000 conversations, seed 0
"""

import argparse
import json
import random
from pathlib import Path

from .. import calculator

SYMBOLS = {"+": "plus", "-": "minus", "*": "times"}
ASKS = (
    "What is {a} {word} {b}?",
    "Compute {a} {sym} {b}.",
    "How much is {a} {sym} {b}?",
    "{a} {sym} {b} = ?",
    "Calculate {a} {word} {b}, please.",
)
GREETINGS = ("Hello!", "Hi there", "Good morning", "Hey", "Hello, how are you?")
GREETING_REPLY = "Hello! How can I help you today?"
WHO, WHO_REPLY = ("Who are you?", "What are you?"), "I am Kimi, an AI assistant created by Moonshot AI."
SYLLABLES = ("ka", "mi", "to", "ra", "ne", "so", "lu", "vi", "do", "pe", "zu", "ga", "bo", "ri", "fa", "te")


def arithmetic(rng):
    """(user message, expression, answer)."""
    sym = rng.choice(list(SYMBOLS))
    a, b = (rng.randint(10, 10 ** rng.randint(2, 5 if sym != "*" else 4) - 1) for _ in range(2))
    expression = f"{a} {sym} {b}"
    return rng.choice(ASKS).format(a=a, b=b, sym=sym, word=SYMBOLS[sym]), expression, calculator.calculate(expression)


def word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def plain(rng):
    """(user message, reply, task) of a turn that needs no tool."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(GREETINGS), GREETING_REPLY, "greeting"
    if kind == 1:
        return rng.choice(WHO), WHO_REPLY, "who are you"
    w = word(rng)
    if kind == 2:
        return f"Repeat after me: {w}", w, "repeat a made-up word"
    return f"Write {w} in capital letters.", w.upper(), "capitalise a made-up word"


def tool_turn(rng, index):
    """The messages of a user turn answered through the calculator (its call numbered `index` in the
    conversation), and the final reply."""
    ask, expression, answer = arithmetic(rng)
    call = {
        "id": f"functions.{calculator.NAME}:{index}",
        "type": "function",
        "function": {"name": calculator.NAME, "arguments": json.dumps({"expression": expression})},
    }
    reply = f"{expression} = {answer}."
    return [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": calculator.NAME, "content": answer},
        {"role": "assistant", "content": reply},
    ], reply


def conversation(rng):
    """{"messages", "tools", "kind", "task"}: one or two user turns, each needing the tool (kind "tool", task
    "arithmetic") or not ("plain", one of plain's tasks); the conversation's kind and task are its last turn's (what
    the benchmark scores)."""
    messages, calls = [], 0
    for _ in range(1 if rng.random() < 0.7 else 2):
        if rng.random() < 0.6:
            turn, _ = tool_turn(rng, calls)
            calls, kind, task = calls + 1, "tool", "arithmetic"
        else:
            ask, reply, task = plain(rng)
            turn, kind = [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}], "plain"
        messages += turn
    return {"messages": messages, "tools": [calculator.DEFINITION], "kind": kind, "task": task}


def conversations(count, seed):
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(count)]


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m nanokimi.bench.chat_tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="data/chat_arithmetic.jsonl", help="the JSON Lines file written")
    p.add_argument("--conversations", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0, help="the benchmark holds out seed 1's conversations")
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for c in conversations(args.conversations, args.seed):
            f.write(json.dumps(c) + "\n")
    print(f"wrote {args.out}: {args.conversations} conversations (seed {args.seed})")


if __name__ == "__main__":
    main()
