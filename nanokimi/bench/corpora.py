"""`nanokimi bench prepare`: how fast `nanokimi prepare` streams corpora of growing size in each format, and in
how much memory, next to the tokenizer's own batched rate on the same documents (the limit it can approach).

Corpora are generated: documents of 1..40 consecutive passages of a source text (TinyShakespeare by default) at
seeded random places, written as .txt with separators, .jsonl and .parquet files of at most 100 MB each."""

import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UserError
from .report import table, write_section

SEPARATOR = "<|endoftext|>"
FILE_BYTES = 100 * 10**6


def passages(source):
    """The source's paragraphs (its lines, if it has one paragraph): what documents are cut from."""
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e.strerror})"
        raise UserError(f"--source={source} {why}: name a UTF-8 text file, e.g. TinyShakespeare") from None
    found = [p for p in text.split("\n\n") if p.strip()]
    found = found if len(found) > 1 else [line for line in text.splitlines(keepends=True) if line.strip()]
    if not found:
        raise UserError(f"--source={source} holds no text: name a UTF-8 text file, e.g. TinyShakespeare")
    return found


def documents(source, size, seed=0):
    """Documents of about `size` bytes in all: each 1..40 consecutive passages from a random place."""
    rng, parts, total = random.Random(seed), passages(source), 0
    while total < size:
        start = rng.randrange(len(parts))
        doc = "\n\n".join(parts[start : start + rng.randint(1, 40)])
        total += len(doc.encode())
        yield doc


def write_corpus(folder, fmt, docs):
    """docs into folder as files of at most FILE_BYTES; returns how many documents and bytes of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    count, text_bytes, batch, batch_bytes, part = 0, 0, [], 0, 0

    def flush():
        path = folder / f"part-{part:04}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"text": batch}), path, row_group_size=10_000)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in batch))
        else:
            path.write_text(SEPARATOR.join(batch))

    for doc in docs:
        batch.append(doc)
        size = len(doc.encode())
        batch_bytes, count, text_bytes = batch_bytes + size, count + 1, text_bytes + size
        if batch_bytes >= FILE_BYTES:
            flush()
            batch, batch_bytes, part = [], 0, part + 1
    if batch:
        flush()
    return count, text_bytes


def encode_rate(tokenizer, docs, rounds=1):
    """MB/s and tokens/s of tokenizers' own encode_batch_fast over docs held in memory, batches of 1,000
    documents (the median of `rounds`)."""
    text_bytes, rates = sum(len(d.encode()) for d in docs), []
    for _ in range(rounds):
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(docs), 1000):
            tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(docs[i : i + 1000], add_special_tokens=False))
        rates.append((text_bytes / 1e6 / (time.perf_counter() - t0), tokens / (time.perf_counter() - t0)))
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


# runs `nanokimi prepare` and prints the process's own peak RSS (VmHWM) as its last line. Not getrusage: a child's
# ru_maxrss counts the parent's resident memory at fork (Linux keeps the larger across exec), here the benchmark's
# documents held for the limit's timing, which is what a first version of this benchmark reported.
PEAK_RSS = """import runpy, sys
sys.argv = ["nanokimi", "prepare", *sys.argv[1:]]
try:
    runpy.run_module("nanokimi", run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        print("peak-rss-kB", next(line.split()[1] for line in status if line.startswith("VmHWM")))
"""


def timed_prepare(args):
    """Wall seconds, peak RSS (MB) and output of one `nanokimi prepare` process."""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *args, "--no_progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode:
        raise RuntimeError(f"prepare {' '.join(args)} failed: {result.stderr.strip()[-300:]}")
    *printed, peak = result.stdout.strip().splitlines()
    return seconds, int(peak.split()[1]) / 1024, "\n".join(printed)


def bench_prepare(args):
    from tokenizers import Tokenizer

    out = Path(args.out)
    passages(args.source)  # a bad --source said before anything is written
    sample_mb = min(10, max(args.sizes_mb))  # what the BPE is learnt from: 10 MB, or the largest corpus if smaller
    tok_dir = out / f"tokenizer-{args.vocab_size}-{sample_mb:g}MB"  # a kept tokenizer serves its own settings only
    if not (tok_dir / "tokenizer.json").is_file():  # one BPE for every corpus, learnt from documents of the source
        shutil.rmtree(out / "tokenizer-corpus", ignore_errors=True)  # a larger sample's files left by an earlier run
        write_corpus(out / "tokenizer-corpus", "jsonl", documents(args.source, int(sample_mb * 1e6), seed=1))
        timed_prepare(
            [
                "text",
                f"--input={out / 'tokenizer-corpus'}",
                "--tokenizer=bpe",
                f"--vocab_size={args.vocab_size}",
                f"--out={tok_dir}",
            ]
        )
    tokenizer_json = tok_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(tokenizer_json))
    rows, notes = [], []
    for size_mb in args.sizes_mb:
        size = int(size_mb * 1e6)
        limit_docs = list(documents(args.source, min(size, args.limit_mb * 10**6)))
        before, runs = encode_rate(tok, limit_docs), []
        for fmt in args.formats:
            folder = out / f"corpus-{size_mb:g}MB-{fmt}"
            count, text_bytes = write_corpus(folder, fmt, documents(args.source, size))
            extra = [f"--doc_separator={SEPARATOR}"] if fmt == "txt" else []
            seconds, rss, _ = timed_prepare(
                ["text", f"--input={folder}", f"--tokenizer={tokenizer_json}", *extra, f"--out={out / 'dataset'}"]
            )
            meta = json.loads((out / "dataset" / "meta.json").read_text())
            assert meta["train_documents"] + meta["val_documents"] == count, (meta, count)
            runs.append(
                [
                    f"{size_mb:g} MB",
                    fmt,
                    "given tokenizer.json",
                    f"{count:,}",
                    f"{meta['train_tokens'] + meta['val_tokens']:,}",
                    f"{seconds:.1f}",
                    text_bytes / 1e6 / seconds,
                    f"{rss:,.0f}",
                ]
            )
            if fmt == args.formats[0] and args.bpe:
                seconds, rss, _ = timed_prepare(
                    [
                        "text",
                        f"--input={folder}",
                        "--tokenizer=bpe",
                        *extra,
                        f"--vocab_size={args.vocab_size}",
                        f"--out={out / 'dataset'}",
                    ]
                )
                runs.append(
                    [
                        f"{size_mb:g} MB",
                        fmt,
                        f"bpe (trained, vocab {args.vocab_size})",
                        f"{count:,}",
                        "",
                        f"{seconds:.1f}",
                        text_bytes / 1e6 / seconds,
                        f"{rss:,.0f}",
                    ]
                )
            if not args.keep:
                shutil.rmtree(folder)
        after = encode_rate(tok, limit_docs)  # before and after the prepares: the machine drifts
        limit = (before[0] + after[0]) / 2
        rows += [
            row[:6] + [f"{row[6]:.2f}", row[7], f"{row[6] / limit:.2f}x" if "given" in row[2] else ""] for row in runs
        ]
        notes.append(
            f"{size_mb:g} MB: encode_batch_fast {before[0]:.2f} MB/s before, {after[0]:.2f} after "
            f"({before[1] / 1e6:.2f}M / {after[1] / 1e6:.2f}M tokens/s) on the first "
            f"{sum(len(d.encode()) for d in limit_docs) / 1e6:.0f} MB of the same documents, in memory"
        )
    body = (
        f"Corpora generated from {Path(args.source).name} (documents of 1..40 consecutive passages at seeded "
        f"random places, files of at most 100 MB), prepared with one byte-level BPE tokenizer.json of "
        f"{tok.get_vocab_size()} tokens learnt from {sample_mb:g} MB of such documents (`--tokenizer=PATH`), "
        f"each in its own process (peak RSS: the process's own VmHWM). 'vs limit' = prepare's MB/s over "
        f"tokenizers' own "
        f"`encode_batch_fast` rate on the same documents held in memory, the mean of its rates measured just "
        f"before and just after that size's runs.\n\n"
        + table(
            ["corpus", "format", "tokenizer", "documents", "tokens", "seconds", "MB/s", "peak RSS MB", "vs limit"], rows
        )
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
    )
    write_section(args.report, "prepare", body, args.command)
