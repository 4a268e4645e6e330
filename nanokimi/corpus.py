"""The documents of a corpus, read as a stream: files, folders and globs of .txt, .jsonl / .json (also .gz) and
.parquet, or a Hugging Face dataset. Nothing is held whole: a reader yields one document (or one piece of a long
one) at a time, so `prepare` runs in memory that does not grow with the corpus.

A reader yields (new_document, text): new_document is False for a piece that continues the previous document (a
long .txt read in ~1 MB pieces, each cut after a newline, so that a whitespace-splitting tokenizer such as byte-level
BPE encodes the pieces exactly as it would the whole)."""

import codecs
import glob
import gzip
import io
import itertools
import json
from pathlib import Path

from .errors import UserError, check_text

FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PIECE_BYTES = 1 << 20  # a document longer than this is read and encoded in pieces of about this size
BATCH_ROWS = 1024  # Parquet rows per batch read


def file_format(path):
    """txt, jsonl or parquet, by the name (a .gz suffix is read through gzip), else None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def expand_inputs(inputs, flag="--input", skip=()):
    """The files named by `inputs` (files, folders searched recursively, globs), in a fixed order: each argument's
    files sorted by path, arguments in the order given. A file given by name must have a known format; a folder or
    glob keeps only files of known formats, and none of `skip` (the files a prepare writes: a dataset written into
    the input folder is no input to the next prepare). `flag` names the option in messages."""
    files, skip = [], {Path(f).resolve() for f in skip}

    def listed(paths):
        return sorted(p for p in paths if p.is_file() and file_format(p) and p.resolve() not in skip)

    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = listed(
                p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UserError(
                    f"{flag}: folder {path} holds no .txt, .jsonl, .json or .parquet file (also .gz): "
                    f"pass a folder of documents"
                )
        elif path.exists() and not path.is_file():
            raise UserError(f"{flag} {path} is not a regular file (a fifo or device?): pass a file, folder or glob")
        elif path.is_file():
            if file_format(path) is None:
                raise UserError(
                    f"{path}: unknown format {''.join(path.suffixes) or '(no suffix)'}: name it .txt, "
                    f".jsonl, .json or .parquet (optionally .gz)"
                )
            found = [path]
        elif glob.has_magic(spec):
            found = listed(Path(p) for p in glob.glob(spec, recursive=True))
            if not found:
                raise UserError(f"{flag} {spec} matches no .txt, .jsonl, .json or .parquet file")
        else:
            raise UserError(f"{flag} {path} not found: pass {flag}=PATH to existing files, folders or globs")
        files += found
    seen = {}
    for f in files:  # the same file by two names (a folder given twice, a/../a, a link): read twice otherwise
        if (same := seen.setdefault(f.resolve(), f)) is not f:
            raise UserError(
                f"{f} is {same} again (named twice by {flag}, or a link to it): each document would be "
                f"read twice, pass each file once"
            )
    return files


class TextRecords:
    """How a JSON or Parquet record holds a document: as text in one field. (conversations.py reads conversations.)"""

    plain_text = True  # a .txt file is a document too

    def __init__(self, field="text"):
        self.field, self.fields = field, (field,)  # fields: the Parquet columns read

    def document(self, record, where):
        return document_text(record, self.field, where)

    def no_column(self, path, names):
        return f"{path} has no column {self.field!r} (its columns: {', '.join(names[:8])}): pass --text_field=NAME"


class Corpus:
    """The documents of local files, in order. `bytes_read` is how many bytes of the files have been read so far
    (for progress); `total_bytes` their size on disk. `records` says how a JSON or Parquet record holds a document
    (TextRecords: the text of field `text_field`)."""

    def __init__(self, inputs, text_field="text", doc_separator=None, flag="--input", skip=(), records=None):
        self.files = expand_inputs(inputs, flag, skip)
        self.records = records or TextRecords(text_field)
        self.doc_separator = doc_separator or None
        if not self.records.plain_text and (text := next((f for f in self.files if file_format(f) == "txt"), None)):
            raise UserError(f"{text} is plain text: {flag} takes .jsonl, .json or .parquet files of records here")
        self.listed = {f: stamp(f) for f in self.files}  # what each file was when listed: every pass reads that
        self.total_bytes = sum(size for size, _ in self.listed.values())
        self.bytes_read = 0

    @property
    def single_document(self):
        """One .txt file read whole: today's TinyShakespeare case (no boundary token, split by tokens)."""
        return len(self.files) == 1 and file_format(self.files[0]) == "txt" and self.doc_separator is None

    def __iter__(self):
        self.bytes_read = 0
        for path in self.files:
            start = self.bytes_read
            try:
                raw = open(path, "rb")
            except OSError as e:
                raise UserError(
                    f"cannot open {path} ({e.strerror}): it was there when prepare started; was it moved "
                    f"or deleted? Prepare again"
                ) from None
            with raw:
                self.check_unchanged(path)
                if path.suffix.lower() == ".gz" and self.listed[path][0] == 0:
                    raise UserError(f"{path} is empty (0 bytes), not a gzip file: is it damaged or truncated?")
                stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
                reader = {"txt": self.txt, "jsonl": self.jsonl, "parquet": self.parquet}[file_format(path)]
                try:
                    for item in reader(path, stream):
                        self.bytes_read = start + raw.tell()
                        yield item
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise UserError(
                        f"cannot read {path} ({e.__class__.__name__}: {str(e)[:80]}): is it damaged or truncated?"
                    ) from None
                self.check_unchanged(path)
            self.bytes_read = start + self.listed[path][0]

    def check_unchanged(self, path):
        """A UserError if `path` changed since it was listed: its documents would differ between the passes over
        the corpus (the tokenizer's, the dataset's) or from its size in the progress and checks."""
        try:
            now = stamp(path)
        except OSError:
            now = None
        if now != self.listed[path]:
            raise UserError(
                f"{path} changed while prepare read it (written to, replaced or deleted): prepare again "
                f"once it is complete"
            )

    def txt(self, path, stream):
        """One document per file, or per --doc_separator; a long document in pieces cut after a newline."""
        sep, pending, offset = self.doc_separator, "", 0  # pending: text read but not yet yielded
        continuing, yielded = False, False  # continuing: the next text yielded continues a document
        for lines in line_batches(stream):
            try:
                pending += lines.decode("utf-8-sig" if offset == 0 else "utf-8")  # a byte-order mark is no text
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text (at byte {offset + e.start:,}): convert it to UTF-8 first"
                ) from None
            offset += len(lines)
            if sep is not None:
                *docs, pending = pending.split(sep)
                for doc in docs:
                    yield not continuing, doc
                    continuing, yielded = False, True
            # a separator may begin in the last len(sep) - 1 characters: never cut there
            keep = len(sep) - 1 if sep else 0
            if len(pending) > PIECE_BYTES and (cut := piece_end(pending[: len(pending) - keep])) > 0:
                yield not continuing, pending[:cut]
                pending, continuing, yielded = pending[cut:], True, True
        if pending or not yielded:
            yield not continuing, pending

    def jsonl(self, path, stream):
        """One document per record: per line (JSON Lines; blank lines skipped) or per element of a file holding one
        JSON array."""
        for where, record in json_records(path, stream):
            yield True, self.records.document(record, where)

    def parquet(self, path, stream):
        """One document per row."""
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or nanokimi[data])") from None
        try:
            table = pq.ParquetFile(stream)
            names = table.schema_arrow.names
        except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError kinds for a bad file
            raise UserError(f"{path} is not a readable Parquet file ({str(e)[:80]})") from None
        columns = [name for name in self.records.fields if name in names]
        if not columns:
            raise UserError(self.records.no_column(path, names))
        row, batches = 0, table.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        while True:
            try:  # a damaged page or a string column that is not UTF-8 fails here, not when the file opens
                records = next(batches, None)
                records = None if records is None else records.to_pylist()
            except Exception as e:  # pyarrow's ArrowInvalid, OSError, UnicodeDecodeError, ...
                raise UserError(
                    f"cannot read {path} after row {row} ({e.__class__.__name__}: {str(e)[:80]}): is "
                    f"it damaged, or is its {' or '.join(map(repr, columns))} column not UTF-8 "
                    f"text?"
                ) from None
            if records is None:
                return
            for record in records:
                row += 1
                yield True, self.records.document(record, f"{path} row {row}")


def json_records(path, stream, chunk=PIECE_BYTES):
    """(where, record) of each JSON value of a JSON Lines file, or of the array a .json file holds: read in chunks,
    so that memory holds about one record, not the file. `where` is "PATH:LINE"."""
    reader = stream if hasattr(stream, "peek") else io.BufferedReader(stream)
    if not reader.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        for number, line in enumerate(reader, 1):
            if line.strip():
                yield f"{path}:{number}", parse_json(line, f"{path}:{number}", "one JSON object per line (JSON Lines)")
        return
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()
    text, position, line = "", 0, 1  # line: the line number at text[position]

    def advance(to):
        nonlocal position, line
        line += text.count("\n", position, to)
        position = to

    def fill():  # the next chunk after what is not yet read; False at the end of the file
        nonlocal text, position
        more = reader.read(chunk)
        try:
            text, position = text[position:] + utf8.decode(more, final=not more), 0
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8: convert the file to UTF-8 first") from None
        return bool(more)

    ended = not fill()
    advance(text.index("[") + 1)
    while True:
        advance(skip_space(text, position, ","))
        if position >= len(text) or text[position] != "]":
            try:
                record, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as e:  # a record cut at the chunk's end: read on
                if ended:
                    raise UserError(
                        f"{path}:{line} is not a JSON value ({e.msg}): a .json file holds JSON Lines or "
                        f"one array of objects (is it truncated?)"
                    ) from None
                ended = not fill()
                continue
            except RecursionError:
                raise UserError(f"{path}:{line} is nested too deeply to read") from None
            yield f"{path}:{line}", record
            advance(end)
        else:
            return


def skip_space(text, position, also):
    while position < len(text) and (text[position].isspace() or text[position] in also):
        position += 1
    return position


def parse_json(line, where, form):
    try:
        return json.loads(line)
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8: convert the file to UTF-8 first") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not a JSON object ({e.msg}): {form}") from None
    except RecursionError:
        raise UserError(f"{where} is nested too deeply to read") from None


def document_text(record, field, where):
    if not isinstance(record, dict):
        raise UserError(f'{where} is not a JSON object: one object per line, e.g. {{"{field}": "..."}}')
    if field not in record:
        raise UserError(
            f"{where} has no field {field!r} (it has: {', '.join(list(record)[:8])}): pass --text_field=NAME"
        )
    if not isinstance(record[field], str):
        raise UserError(f"{where}: {field!r} is {type(record[field]).__name__}, not a string of text")
    return check_text(record[field], where, field)


def stamp(path):
    """A file's size and modification time: a file that was written to or replaced has another."""
    info = Path(path).stat()
    return info.st_size, info.st_mtime_ns


def line_batches(stream, size=PIECE_BYTES // 4):
    """Whole lines of a binary stream in batches of about `size` bytes (never cut inside a UTF-8 character)."""
    reader = io.BufferedReader(stream) if not isinstance(stream, io.BufferedIOBase) else stream
    while batch := reader.readlines(size):
        yield b"".join(batch)


def piece_end(text):
    """Where a long document may be cut without changing how a whitespace-splitting tokenizer splits it: after the
    last newline that a non-whitespace character follows (0 if there is none)."""
    cut = len(text) - 1
    while (cut := text.rfind("\n", 0, cut)) >= 0:
        if not text[cut + 1].isspace():
            return cut + 1
    return 0


class HFDataset:
    """The documents of a Hugging Face dataset, streamed with `datasets` (the hub, or a packaged builder such as
    "json" / "parquet" over local data_files). Its size is not known ahead: `total_bytes` is None."""

    def __init__(self, name, config=None, split="train", text_field="text", data_files=None, records=None):
        try:
            import datasets
        except ImportError:
            raise UserError(
                "`prepare hf` needs the datasets library: pip install datasets (or nanokimi[data])"
            ) from None
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures become one line here, not logs
        try:
            self.dataset = datasets.load_dataset(name, name=config, split=split, streaming=True, data_files=data_files)
        except Exception as e:  # datasets raises many kinds (not found, offline, bad config)
            raise UserError(
                f"cannot open dataset {name!r} ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})"
                f": check --dataset, --name and --split, and that you are online"
            ) from None
        self.name, self.records = name, records or TextRecords(text_field)
        self.files, self.total_bytes, self.bytes_read, self.single_document = [name], None, 0, False

    def __iter__(self):
        self.bytes_read, records = 0, iter(self.dataset)
        for row in itertools.count(1):
            try:  # a builder's failure to read a record (a bad JSON line, a damaged file) comes as it streams
                record = next(records, None)
            except Exception as e:
                raise UserError(
                    f"dataset {self.name} cannot be read after {row - 1} rows ({e.__class__.__name__}: "
                    f"{str(e).splitlines()[0][:120] if str(e) else ''}): fix or drop that record"
                ) from None
            if record is None:
                return
            document = self.records.document(record, f"dataset {self.name} row {row}")
            self.bytes_read += len(document) if isinstance(document, str) else 1  # characters (or records): a
            yield True, document  # streamed dataset's bytes on disk are not known


def progress_bar(corpus, what, enabled):
    from tqdm import tqdm

    return tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc=what, disable=not enabled, dynamic_ncols=True)


def describe(corpus):
    names = [str(f) for f in corpus.files]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
