"""Chat finetuning (docs/chat.md): conversations read and checked (prepare chat), Kimi-K2's template as transformers
renders it, the loss mask, chat rows, SFT, `nanokimi chat` (cached turns, -m, stdin, tool calls) and the calculator."""

import gzip
import json
import re
import subprocess

import numpy as np
import pytest
import torch

import nanokimi
from nanokimi import calculator
from nanokimi.chat import Chat
from nanokimi.chat_template import CHAT_TOKENS, IM_END, encode, parse_reply
from nanokimi.errors import UserError
from nanokimi.checkpoint import load_model
from nanokimi.cli import main
from nanokimi.batches import ChatData
from nanokimi.tokenizer import load_tokenizer
from tests.conftest import NANOKIMI, assert_greedy, run_cli, teacher_forced_logits, train_args

SYSTEM = {"role": "system", "content": "Be brief."}
TOOLS = [calculator.DEFINITION]


def conversation(i):
    """Short conversations of every shape the template renders: plain, multi-turn, tool calls (id renamed), text
    parts, ShareGPT."""
    a, b = 10 + i, 7 * i + 3
    if i % 4 == 0:
        return {
            "messages": [
                SYSTEM,
                {"role": "user", "content": f"add {a} {b}"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": "calculator", "arguments": f'{{"expression": "{a}+{b}"}}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": f"call_{i}", "content": str(a + b)},
                {"role": "assistant", "content": f"{a + b}"},
            ],
            "tools": TOOLS,
        }
    if i % 4 == 1:
        return {
            "messages": [
                SYSTEM,
                {"role": "user", "content": [{"type": "text", "text": f"echo {a}"}]},
                {"role": "assistant", "content": f"{a}"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": f"{a} {a}"},
            ]
        }
    if i % 4 == 2:
        return {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"hi {b}"},
                {"from": "gpt", "value": f"hello {b}"},
            ]
        }
    return {"messages": [SYSTEM, {"role": "user", "content": f"say {b}"}, {"role": "assistant", "content": f"{b}!"}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return write_jsonl(root / "conversations.jsonl", [conversation(i) for i in range(80)])


@pytest.fixture(scope="module")
def chat_data(chat_files):
    out = chat_files.parent / "char"
    main(["prepare", "chat", f"--input={chat_files}", f"--out={out}", "--no_progress"])
    return out


def train_on_chat(chat_data, name, *flags, steps=20):
    """A tiny model trained `steps` steps on the chat data (enough to test the paths, not to answer well)."""
    out = chat_data.parent / name
    main(
        [
            *train_args(chat_data, out),
            "--block_size=128",
            "--max_position_embeddings=256",
            f"--max_iters={steps}",
            "--eval_interval=10",
            *flags,
        ]
    )
    return out


@pytest.fixture(scope="module")
def chat_run(chat_data):
    return train_on_chat(chat_data, "run")


def test_the_mask_trains_the_assistants_replies_tool_calls_and_turn_ends_only(chat_data, chat_files):
    tokenizer = load_tokenizer(chat_data)
    ids = np.concatenate([np.fromfile(chat_data / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    mask = np.concatenate([np.fromfile(chat_data / f"{s}_mask.bin", dtype=np.uint8) for s in ("train", "val")])
    trained = tokenizer.decode(ids[mask == 1].tolist())
    first = conversation(0)["messages"]
    call = (
        f"<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>"
        f"{first[2]['tool_calls'][0]['function']['arguments']}<|tool_call_end|><|tool_calls_section_end|>"
    )
    assert trained.startswith(call + IM_END + first[4]["content"] + IM_END), trained[:300]  # tool calls train
    untrained = tokenizer.decode(ids[mask == 0].tolist())
    for text in ("add 10 3", "Be brief.", "## Return of functions.calculator:0\n    13", "<|im_assistant|>assistant"):
        assert text in untrained and text not in trained  # prompts, tool results and role headers do not
    meta = json.loads((chat_data / "meta.json").read_text())
    assert meta["chat"]["train_trained_tokens"] + meta["chat"]["val_trained_tokens"] == mask.sum()
    assert meta["train_documents"] + meta["val_documents"] == 80 and meta["val_documents"] == 8  # whole ones


def test_json_arrays_gzip_and_parquet_give_the_same_dataset(chat_files, chat_data, tmp_path):
    records = [json.loads(line) for line in chat_files.read_text().splitlines()]
    array = tmp_path / "array.json.gz"
    array.write_bytes(gzip.compress(("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]").encode()))
    main(["prepare", "chat", f"--input={array}", f"--out={tmp_path / 'a'}", "--no_progress"])
    for name in ("train.bin", "val_mask.bin", "train_starts.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (chat_data / name).read_bytes(), name
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    sharegpt = [r for r in records if "conversations" in r]
    pq.write_table(pa.Table.from_pylist(sharegpt), tmp_path / "s.parquet")
    write_jsonl(tmp_path / "s.jsonl", sharegpt)
    for name in ("s.parquet", "s.jsonl"):
        main(
            [
                "prepare",
                "chat",
                f"--input={tmp_path / name}",
                f"--out={tmp_path / name}.out",
                "--no_progress",
                f"--tokenizer_from={chat_data}",
            ]
        )
    assert (tmp_path / "s.parquet.out/train.bin").read_bytes() == (tmp_path / "s.jsonl.out/train.bin").read_bytes()
    pytest.importorskip("datasets")  # a Hugging Face dataset, streamed (the json builder: offline)
    main(
        [
            "prepare",
            "chat",
            "--dataset=json",
            f"--input={chat_files}",
            f"--out={tmp_path / 'hf'}",
            "--no_progress",
            f"--tokenizer_from={chat_data}",
        ]
    )
    for name in ("train.bin", "train_mask.bin", "val_starts.bin"):
        assert (tmp_path / "hf" / name).read_bytes() == (chat_data / name).read_bytes(), name


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [{"content": "hi"}]}, 'message 1 has no "role"'),
        ({"messages": [{"role": "user", "content": 3}]}, 'message 1: "content" is int, not a string'),
        ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "answers tool call 'x', which no"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role 'wizard'"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
        ({"text": "hi"}, 'no "messages" (OpenAI form) or "conversations"'),
        ({"messages": []}, "non-empty list of messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "half of a UTF-16"),
    ],
)
def test_a_bad_conversation_is_one_line_naming_file_and_line(tmp_path, record, expected):
    src = write_jsonl(tmp_path / "c.jsonl", [conversation(3), record])
    result = run_cli("prepare", "chat", f"--input={src}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{src}:2" in result.stderr and expected in result.stderr, result.stderr
    assert not (tmp_path / "out" / "train.bin").exists()


def test_empty_and_plain_text_inputs_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "t.txt").write_text("hello")
    for name, expected in (("empty.jsonl", "is empty"), ("t.txt", "plain text")):
        result = run_cli("prepare", "chat", f"--input={tmp_path / name}", f"--out={tmp_path / 'o'}")
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_rows_start_at_conversations_pack_whole_ones_and_score_only_the_assistant(chat_data):
    data = ChatData(chat_data, 96)
    tokens, mask, bounds = data.splits["train"], data.masks["train"], data.starts["train"]
    picked = data.rows["train"][:3].tolist()
    x, y = data.windows("train", picked)
    for row, targets, c in zip(x, y, picked):
        start = bounds[c]
        end = bounds[np.searchsorted(bounds, start + 97, side="right") - 1]  # the last whole conversation's end
        assert end > start and row[: end - start].tolist() == tokens[start:end].tolist()
        assert (targets[: end - start - 1] >= 0).tolist() == (mask[start + 1 : end] == 1).tolist()
        assert (targets[end - start - 1 :] == -1).all()  # padding never trains
    short = ChatData(chat_data, 60)  # the multi-turn ones are cut; the tool ones reply after their tool list
    assert "36 of 72 train conversations are longer than block_size + 1 = 61 tokens" in short.notes[0]
    assert "20 train conversations have no reply that ends within their first 61 tokens: left out" in short.notes[1]
    assert len(short.rows["train"]) == sum(1 for i in range(80) if i % 4 and i % 10 != 9) > 0  # those left
    c = next(c for c in short.rows["train"] if bounds[c + 1] - bounds[c] > 61)  # a two-reply conversation
    trained = np.flatnonzero(mask[bounds[c] : bounds[c + 1]])
    first_end = trained[np.flatnonzero(np.diff(trained) > 1)[0]]  # its first reply's <|im_end|>
    second = trained[trained > first_end][0]  # where its second reply starts
    x, y = ChatData(chat_data, second + 2).windows("train", [c])  # a row that ends inside the second reply
    assert (y[0, :first_end] >= 0).tolist() == (mask[bounds[c] + 1 : bounds[c] + first_end + 1] == 1).tolist()
    assert (y[0, first_end:] == -1).all() and mask[bounds[c] + second]  # the second reply does not train in part


def test_sft_evaluates_the_assistants_tokens(chat_run, chat_data):
    records = [json.loads(line) for line in (chat_run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    result = run_cli("eval", chat_run, f"--data={chat_data}", "--batches=2", "--batch_size=4")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    data = ChatData(chat_data, 128)
    _, y = data.windows("val", data.eval_starts("val", 8))
    assert report["tokens"] == int((y >= 0).sum())  # scored: the assistant's tokens of the same rows, no others


@pytest.fixture(scope="module")
def hybrid_chat_run(chat_data):
    """A Kimi Linear hybrid (KDA, MLA, KDA): its KDA state is the cache."""
    from tests.test_kda import HYBRID_FLAGS

    return train_on_chat(chat_data, "hybrid", *HYBRID_FLAGS, steps=10)


@pytest.mark.parametrize("run", ["chat_run", "hybrid_chat_run"])
def test_cached_turns_are_greedy_and_each_token_is_read_once(run, request):
    model, tokenizer, _ = load_model(request.getfixturevalue(run))
    read, forward = [], model.forward
    model.forward = lambda idx, *a, **k: read.append(idx.shape[1]) or forward(idx, *a, **k)
    cached = talk(model, tokenizer, use_cache=True)
    assert sum(read) == cached.cached >= len(cached.ids) - 2  # each token read once, none prefilled again (the
    # last reply's <|im_end|>, and its last token where max_new_tokens cut it, are read with the next turn)
    model.forward = forward
    assert_replies_greedy(cached, model)
    assert_replies_greedy(talk(model, tokenizer, use_cache=False), model)


def talk(model, tokenizer, use_cache, max_new_tokens=24):
    chat = Chat(
        model,
        tokenizer,
        system="Be brief.",
        temperature=0,
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
        out=open("/dev/null", "w"),
    )
    for text in ("say 3", "again", "say 10"):
        chat.say(text)
    return chat


def assert_replies_greedy(chat, model):
    """Each token the model sampled is a greedy choice of it teacher-forced on the whole conversation without cache."""
    replies = [i for start, end in chat.sampled for i in range(start, end)]
    assert len(replies) >= 3
    seq = torch.tensor([chat.ids])
    assert_greedy(seq[:, replies], teacher_forced_logits(model, seq, 1)[:, [i - 1 for i in replies]])


def test_chat_m_prints_one_line_per_reply_and_reads_a_pipe(chat_run, chat_data, char_data, tmp_path):
    result = run_cli(
        "chat", chat_run, "-m", "say 3", "-m", "again", "--temperature=0", "--max_new_tokens=8", "--system=Be brief."
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 3 and lines[-1] == "", result.stdout  # two replies, each ending in a newline
    piped = subprocess.run(
        [
            *NANOKIMI,
            "chat",
            str(chat_run),
            "--temperature=0",
            "--max_new_tokens=8",
            "--system=Be brief.",
        ],
        input="say 3\nagain\n",
        capture_output=True,
        text=True,
    )
    assert piped.stdout == result.stdout
    main(
        [
            *train_args(char_data, tmp_path / "base"),
            "--max_iters=1",
        ]
    )
    default_system = run_cli("chat", chat_run, "-m", "hi")  # its characters were never in the data
    assert default_system.returncode == 2 and "pass --system" in default_system.stderr, default_system.stderr
    base = run_cli("chat", tmp_path / "base", "-m", "hi")
    assert base.returncode == 2 and "no chat tokens" in base.stderr and base.stderr.count("\n") == 1, base.stderr


class ScriptedModel(torch.nn.Module):
    """A model that writes given replies, one after the other, token by token (each reply ends with <|im_end|>): to
    test the tool loop on replies a tiny trained model would not make."""

    has_kv_cache = False

    def __init__(self, tokenizer, replies, context=4096):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, tokenizer.vocab_size, bias=False)
        self.tokens = [t for reply in replies for t in encode_reply(tokenizer, reply)]
        self.context_length, self.vocab = context, tokenizer.vocab_size

    def forward(self, idx):
        logits = torch.zeros(1, idx.shape[1], self.vocab)
        logits[0, -1, self.tokens.pop(0)] = 1.0
        return logits, None


def encode_reply(tokenizer, text):
    """The ids of a reply's text (its chat tokens as theirs), then <|im_end|>."""
    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")", text):
        ids += [tokenizer.special_token_id(piece)] if piece in CHAT_TOKENS else tokenizer.encode(piece)
    return ids + [tokenizer.special_token_id(IM_END)]


def test_a_tool_call_is_run_and_answered_before_the_reply(tmp_path):
    from nanokimi.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.train(
        ["1234 * 5678 = 7006652. functions.calculator:0 expression"] * 5, 400, True, CHAT_TOKENS
    )
    call = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>"
        '{"expression": "1234 * 5678"}<|tool_call_end|><|tool_calls_section_end|>'
    )
    out, log = (tmp_path / "out").open("w+"), (tmp_path / "log").open("w+")
    chat = Chat(
        ScriptedModel(tokenizer, [call, "1234 * 5678 = 7006652."]),
        tokenizer,
        tools=["calculator"],
        temperature=0,
        out=out,
        log=log,
    )
    reply = chat.say("What is 1234 * 5678?")
    assert reply == {"role": "assistant", "content": "1234 * 5678 = 7006652."}
    tool = chat.messages[-2]
    assert tool == {
        "role": "tool",
        "tool_call_id": "functions.calculator:0",
        "name": "calculator",
        "content": "7006652",
    }
    out.seek(0)
    assert out.read() == "1234 * 5678 = 7006652.\n"  # the call went to the log, not to stdout
    expected = encode(tokenizer, chat.messages, TOOLS)[0]
    assert chat.ids == expected  # the conversation read by the model is the template's, turn for turn
    assert [chat.ids[a:b] for a, b in chat.sampled] == [
        encode_reply(tokenizer, call),
        encode_reply(tokenizer, "1234 * 5678 = 7006652."),
    ]


def test_parse_reply_reads_kimis_tool_calls():
    text = (
        "Let me see.<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0"
        '<|tool_call_argument_begin|>{"expression": "2+2"}<|tool_call_end|><|tool_call_begin|>bad id'
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"
    )
    assert parse_reply(text) == {
        "role": "assistant",
        "content": "Let me see.",
        "tool_calls": [
            {
                "id": "functions.calculator:0",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'},
            }
        ],
    }
    assert parse_reply("plain") == {"role": "assistant", "content": "plain"}


@pytest.mark.parametrize(
    "expression, value",
    [
        ("12*34", "408"),
        ("(3 + 4) * -2", "-14"),
        ("7/2", "3.5"),
        ("2**10 % 1000", "24"),
        ("123456789 * 987654321", "121932631112635269"),
    ],
)
def test_the_calculator_is_exact(expression, value):
    assert calculator.calculate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "x + 1",
        "9 ** 999999",
        "10 ** 99 * 1e10",
        "1/0",
        "(" * 200 + "1" + ")" * 200,
        "print(1)",
        "[1] * 3",
        "'a' * 3",
    ],
)
def test_the_calculator_refuses_what_is_not_bounded_arithmetic(expression):
    assert calculator.call(json.dumps({"expression": expression})).startswith("error: ")


def test_encode_chat_is_public_and_checks_its_messages(chat_run):
    ids = nanokimi.encode_chat(chat_run, [SYSTEM, {"role": "user", "content": "say 3"}], add_generation_prompt=True)
    assert load_tokenizer(chat_run / "checkpoint").decode(ids).endswith("<|im_assistant|>assistant<|im_middle|>")
    with pytest.raises(UserError, match="unknown role"):
        nanokimi.encode_chat(chat_run, [{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_exported_template_gives_nanokimis_ids_in_transformers(chat_files, tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "data"
    main(
        [
            "prepare",
            "chat",
            f"--input={chat_files}",
            f"--out={data}",
            "--no_progress",
            f"--tokenizer={tokenizer}",
            *(["--vocab_size=300"] if tokenizer == "bpe" else []),
        ]
    )
    main(
        [
            *train_args(data, tmp_path / "run"),
            "--block_size=64",
            "--max_position_embeddings=64",
            "--max_iters=1",
        ]
    )
    assert run_cli("export", tmp_path / "run", tmp_path / "hf").returncode == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for i in range(8):
        record = conversation(i)
        messages = record.get("messages") or [
            {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in record["conversations"]
        ]
        for tools in (record.get("tools"), TOOLS):
            for prompt in (False, True):
                ours = nanokimi.encode_chat(tmp_path / "run", messages, tools, prompt)
                theirs = hf.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=prompt, tokenize=True, return_dict=False
                )
                assert ours == list(theirs), (i, hf.decode(theirs))
    assert hf.eos_token == IM_END


def test_sft_from_a_base_run_adds_the_chat_tokens_and_grows_its_embeddings(chat_files, shakespeare_text, tmp_path):
    src = tmp_path / "plays.txt"
    src.write_text(shakespeare_text[:50_000])
    main(
        [
            "prepare",
            "text",
            f"--input={src}",
            f"--out={tmp_path / 'text'}",
            "--tokenizer=bpe",
            "--vocab_size=300",
            "--no_progress",
        ]
    )
    long = ["--max_position_embeddings=128", "--block_size=128"]
    main(
        [
            *train_args(tmp_path / "text", tmp_path / "base"),
            *long,
            "--max_iters=2",
        ]
    )
    prepared = run_cli(
        "prepare",
        "chat",
        f"--input={chat_files}",
        f"--out={tmp_path / 'chat'}",
        "--no_progress",
        f"--tokenizer_from={tmp_path / 'base'}",
    )
    assert prepared.returncode == 0 and "the 10 chat tokens were added" in prepared.stdout, prepared.stderr
    sft = run_cli(
        *train_args(tmp_path / "chat", tmp_path / "sft"),
        *long,
        "--max_iters=1",
        "--lr=1e-12",
        "--min_lr=1e-12",
        f"--init_from={tmp_path / 'base'}",
    )
    assert sft.returncode == 0 and "10 tokens of" in sft.stdout and "start at the mean" in sft.stdout, sft.stderr
    base, _, _ = load_model(tmp_path / "base")
    grown, tokenizer, _ = load_model(tmp_path / "sft")
    old, new = base.embed_tokens.weight, grown.embed_tokens.weight
    assert new.shape[0] == old.shape[0] + 10 == tokenizer.vocab_size
    torch.testing.assert_close(new[: len(old)], old, atol=1e-6, rtol=0)
    torch.testing.assert_close(new[len(old) :], old.mean(0).expand(10, -1), atol=1e-6, rtol=0)
    ids, _ = encode(tokenizer, [SYSTEM, {"role": "user", "content": "say 3"}])
    assert max(ids) >= len(old)  # the chat tokens are the new ids


class InterruptedModel(ScriptedModel):
    """A scripted model whose `at`-th forward is cut by Ctrl-C (KeyboardInterrupt), as a user stops a reply."""

    def __init__(self, tokenizer, replies, at):
        super().__init__(tokenizer, replies)
        self.calls, self.at = 0, at

    def forward(self, idx):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().forward(idx)


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(tmp_path):
    from nanokimi.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.train(["a long reply that goes on. short."] * 5, 300, True, CHAT_TOKENS)
    model = InterruptedModel(tokenizer, ["a long reply that goes on", "short."], at=4)
    out, log = (tmp_path / "out").open("w+"), (tmp_path / "log").open("w+")
    chat = Chat(model, tokenizer, temperature=0, out=out, log=log)
    first = chat.say("talk")  # three tokens, then Ctrl-C: the reply so far is kept, and ends its turn
    model.tokens = model.tokens[model.tokens.index(tokenizer.special_token_id(IM_END)) + 1 :]  # the script goes on
    assert first["content"] == tokenizer.decode(encode_reply(tokenizer, "a long reply that goes on")[:3])
    assert chat.say("and now?") == {"role": "assistant", "content": "short."}
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.ids == encode(tokenizer, chat.messages)[0]  # the stopped reply is in the conversation, whole turns
    log.seek(0)
    assert "[stopped]" in log.read()


def test_bench_chat_scores_held_out_conversations_and_writes_its_section(tmp_path):
    from nanokimi.bench.chat_tasks import main as write_tasks

    write_tasks(["--out", str(tmp_path / "tasks.jsonl"), "--conversations", "60"])
    main(["prepare", "chat", f"--input={tmp_path / 'tasks.jsonl'}", f"--out={tmp_path / 'data'}", "--no_progress"])
    main(
        [
            *train_args(tmp_path / "data", tmp_path / "run"),
            "--block_size=512",
            "--max_position_embeddings=1024",
            "--max_iters=2",
        ]
    )
    report = tmp_path / "BENCH.md"
    result = run_cli("bench", f"--report={report}", "chat", f"--checkpoint={tmp_path / 'run'}", "--conversations=6")
    assert result.returncode == 0, result.stderr
    section = report.read_text()
    assert "<!-- bench:chat-" in section and "2 steps" in section
    rows = dict(
        re.findall(r"^\| (arithmetic, calculator on|plain turns \(no tool needed\)) \| (\d+/\d+) \|", section, re.M)
    )
    assert sum(int(r.split("/")[1]) for r in rows.values()) == 6  # every conversation scored once with the tool


def test_a_conversation_longer_than_the_context_keeps_its_newest_half(tmp_path):
    from nanokimi.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.train(["one two three four five six seven eight nine ten"] * 5, 300, True, CHAT_TOKENS)
    reply = " ".join(["one two three four five six seven eight nine ten"] * 4)
    model = ScriptedModel(tokenizer, [reply], context=48)
    log = (tmp_path / "log").open("w+")
    chat = Chat(model, tokenizer, system="x", temperature=0, out=(tmp_path / "out").open("w"), log=log)
    assert chat.say("count")["content"] == reply  # the reply goes on past the window, whole
    log.seek(0)
    assert "outgrew the model's 48-token context" in log.read() and chat.dropped > 0
    (start, end), whole = chat.sampled[0], encode_reply(tokenizer, reply)
    assert end - start == len(whole) and chat.dropped + len(chat.ids) == end  # positions count the dropped tokens
    assert chat.ids == whole[len(whole) - len(chat.ids) :]  # what is left: the reply's newest tokens
