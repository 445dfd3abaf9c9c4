"""Dataset validation: stream the JSONL once, in bounded memory, check every row,
and write accepted rows in TRL's conversational prompt/completion form.

A dataset is one JSONL file or object, a folder or S3 prefix of JSONL shards, or a weighted list of
those (settings.dataset_sources); shards ending .gz or .zst are decompressed as they stream.

Accepted formats, one JSON object per line:
  {"instruction", "output"} (+ optional "input", "system")   the seed tutorial's
  {"messages": [{"role", "content"}, ...]}                   chat; every assistant turn is trained
  {"prompt", "completion"}  strings or lists of messages     TRL's own
The prompt is everything before the final assistant turn, the completion that turn, so TRL masks the
prompt and the loss falls on the answer (and its end-of-turn token). A messages row's earlier
assistant turns are trained too unless QLORA_DATA__TRAIN_TURNS=last (rows.expand_turns)."""

import gzip
import hashlib
import io
import json
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from job import storage
from job.errors import DataError
from job.logs import get_logger
from job.settings import DataSettings, Settings, dataset_sources

log = get_logger(__name__)

ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {"instruction": ("instruction", "output"), "messages": ("messages",), "prompt": ("prompt", "completion")}
SHOWN_REJECTS = 20
BOM = b"\xef\xbb\xbf"
SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}  # a compressed file's first bytes


class RowError(ValueError):
    """Why one row was rejected (becomes a line in rejects.jsonl)."""


@dataclass
class Shard:
    """One file of a dataset: where it came from, where it lies here, and its source's mixing weight."""

    uri: str
    path: Path
    name: str  # its key under the source's prefix, or its file name
    source: int = 0  # index into the dataset setting's list of URIs
    weight: float = 1.0


@dataclass
class DataReport:
    source: str
    sha256: str = ""
    size_bytes: int = 0
    lines: int = 0
    blank: int = 0
    accepted: int = 0
    rejected: int = 0
    formats: Counter = field(default_factory=Counter)
    first_rejects: list[dict] = field(default_factory=list)
    truncated: int = 0  # rows over max_seq_length kept for truncation (QLORA_DATA__OVERLENGTH=truncate)
    tokens: int = 0  # set once the rows are tokenized (train.load_train_dataset), over-length ones included
    longest_row_tokens: int = 0
    overlength_rows: int = 0
    shards: list[dict] = field(default_factory=list)  # uri, sha256, bytes, accepted, rejected, weight of each
    weights: list[float] = field(default_factory=lambda: [1.0])  # each source's mixing weight (train rows carry "source")
    train_path: Path | None = None
    rejects_path: Path | None = None

    def add_rejects(self, rejects: list[dict]) -> None:
        """Reject rows found bad after validation (too many tokens): counted, and appended to rejects.jsonl."""
        if not rejects:
            return
        with open(self.rejects_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(reject, ensure_ascii=False) + "\n" for reject in rejects)
        self.accepted -= len(rejects)
        self.rejected += len(rejects)
        self.first_rejects.extend(rejects[:SHOWN_REJECTS])

    @property
    def reject_ratio(self) -> float:
        seen = self.accepted + self.rejected
        return self.rejected / seen if seen else 0.0

    def summary(self) -> dict:
        return {
            "source": self.source, "sha256": self.sha256, "size_bytes": self.size_bytes, "lines": self.lines,
            "blank": self.blank, "accepted": self.accepted, "rejected": self.rejected,
            "reject_ratio": round(self.reject_ratio, 6), "formats": dict(self.formats), "shards": self.shards,
            **({"tokens": self.tokens, "longest_row_tokens": self.longest_row_tokens, "overlength_rows": self.overlength_rows}
               if self.tokens else {}),
            "first_rejects": self.first_rejects,
        }


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise RowError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constants(name: str):
    raise RowError(f"invalid JSON: {name} is not allowed")


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _text(row: dict, key: str, *, required: bool = True, where: str = "") -> str | None:
    name = f"{where}{key}"
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing {name!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{name!r} must be a string, got {_type_name(value)}")
    if "\x00" in value:
        raise RowError(f"{name!r} contains a NUL character")
    if required and not value.strip():
        raise RowError(f"{name!r} is empty")
    return value


def _messages(value: object, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(f"{name!r} must be an array of messages, got {_type_name(value)}")
    if not value:
        raise RowError(f"{name!r} is empty")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]."
        if not isinstance(message, dict):
            raise RowError(f"{name}[{i}] must be an object, got {_type_name(message)}")
        unknown = set(message) - {"role", "content"}
        if unknown:
            raise RowError(f"{name}[{i}] has unexpected key {sorted(unknown)[0]!r} (expected role, content)")
        role = _text(message, "role", where=where)
        if role not in ROLES:
            raise RowError(f"{where}role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise RowError(f"{where}role 'system' is only allowed as the first message")
        # An empty system message is harmless; an empty question or answer is a data bug.
        content = _text(message, "content", where=where, required=role != "system")
        if content is None:
            raise RowError(f"missing {where + 'content'!r}")
        messages.append({"role": role, "content": content})
    return messages


def _split_conversation(messages: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    if messages[-1]["role"] != "assistant":
        raise RowError(f"the last message in {name!r} must be from the assistant, got {messages[-1]['role']!r}")
    prompt = messages[:-1]
    if not any(m["role"] == "user" for m in prompt):
        raise RowError(f"{name!r} has no user message before the answer")
    return prompt, messages[-1:]


def convert_row(row: object, system_prompt: str | None = None) -> tuple[str, list[dict], list[dict]]:
    """Validate one parsed row; return (format, prompt messages, completion messages) or raise RowError."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {_type_name(row)}")
    formats = [name for name, keys in FORMAT_KEYS.items() if any(k in row for k in keys)]
    if not formats:
        raise RowError("no known fields: expected instruction/output, messages, or prompt/completion")
    if len(formats) > 1:
        raise RowError(f"mixes formats: has fields of both {formats[0]!r} and {formats[1]!r}")
    kind = formats[0]
    if kind == "instruction":
        instruction = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        system = _text(row, "system", required=False)
        output = _text(row, "output")
        user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
        prompt = [{"role": "user", "content": user}]
        completion = [{"role": "assistant", "content": output}]
    elif kind == "messages":
        prompt, completion = _split_conversation(_messages(row["messages"], "messages"), "messages")
        system = None
    else:
        if "prompt" not in row:
            raise RowError("missing 'prompt'")
        if "completion" not in row:
            raise RowError("missing 'completion'")
        if isinstance(row["prompt"], list):
            prompt = _messages(row["prompt"], "prompt")
            if prompt[-1]["role"] == "assistant":
                raise RowError("the last message in 'prompt' must not be from the assistant")
            if not any(m["role"] == "user" for m in prompt):
                raise RowError("'prompt' has no user message")
            completion = _messages(row["completion"], "completion")
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise RowError("'completion' must be exactly one assistant message")
        else:
            # Plain strings become one user/assistant exchange: the job trains chat models.
            prompt = [{"role": "user", "content": _text(row, "prompt")}]
            completion = [{"role": "assistant", "content": _text(row, "completion")}]
        system = None
    system = system if system is not None and system.strip() else None
    if prompt[0]["role"] != "system" and (system or system_prompt):
        prompt = [{"role": "system", "content": system or system_prompt}, *prompt]
    return kind, prompt, completion


class _Bomb(Exception):
    """A shard decompressed past QLORA_DATA__MAX_COMPRESSION_RATIO times the compressed bytes read."""


BOMB_FLOOR = 4 << 20  # decompressed bytes always allowed, so a small, very repetitive shard is no bomb


def _read_lines(f, max_line_bytes: int, guard=None):
    """Yield (line number, bytes or None when longer than max_line_bytes); never holds more than one line.
    `guard(decompressed bytes so far)` is called after every MiB read and may raise _Bomb."""
    number, total, next_check = 0, 0, 1 << 20
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        total += len(line)
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while True:  # drain the rest of the over-long line in bounded pieces
                rest = f.readline(1 << 20)
                total += len(rest)
                if guard and total >= next_check:
                    guard(total)
                    next_check = total + (1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        if guard and total >= next_check:
            guard(total)
            next_check = total + (1 << 20)
        yield number, line


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in a file. A frame cut short raises ZstdError (zstandard's
    stream_reader ends there quietly, as if the data were complete), so frames are decoded here, with input
    fed 256 bytes at a time: a zstd block (at most 128 KiB out) takes at least 3 bytes in, so one piece yields
    at most 256 / 3 x 128 KiB = 11 MiB however the data was made, and memory stays bounded."""

    PIECE = 256

    def __init__(self, raw):
        self.raw, self.frame, self.started = raw, zstandard.ZstdDecompressor().decompressobj(), False
        self.input, self.input_at, self.output, self.output_at = b"", 0, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.output_at >= len(self.output):
            if self.input_at >= len(self.input):
                self.input, self.input_at = self.raw.read(64 << 10), 0
                if not self.input:
                    if self.started and not self.frame.eof:
                        raise zstandard.ZstdError("the data ends inside a frame (a truncated upload?)")
                    return 0
            piece = self.input[self.input_at:self.input_at + self.PIECE]
            self.input_at += self.PIECE
            out = []
            while piece:
                if self.frame.eof:  # the next frame of a concatenated file
                    self.frame = zstandard.ZstdDecompressor().decompressobj()
                self.started = True
                out.append(self.frame.decompress(piece))
                piece = self.frame.unused_data if self.frame.eof else b""
            self.output, self.output_at = b"".join(out), 0
        view = memoryview(self.output)[self.output_at:self.output_at + len(buffer)]
        size = len(view)
        buffer[:size] = view
        self.output_at += size
        return size


@contextmanager
def _open_shard(shard: Shard, max_ratio: float = 0.0):
    """(the shard's bytes, decompressed by its suffix; a guard for _read_lines, or None for plain files).
    The guard raises _Bomb past max_ratio times the compressed bytes read so far (0: no limit). Compressed
    bytes under a plain name are refused."""
    with open(shard.path, "rb") as raw:
        suffix = shard.uri.lower().rsplit(".", 1)[-1]

        def guard(decompressed: int) -> None:
            if max_ratio and decompressed > max_ratio * raw.tell() + BOMB_FLOOR:
                raise _Bomb(f"{shard.uri}: decompresses to more than {max_ratio:g} times its compressed size "
                            f"({decompressed >> 20} MiB from {raw.tell() >> 10} KiB): refused as a decompression bomb "
                            f"(QLORA_DATA__MAX_COMPRESSION_RATIO)")

        if suffix == "gz":
            yield gzip.GzipFile(fileobj=raw), guard
        elif suffix == "zst":
            yield io.BufferedReader(_ZstdFrames(raw), buffer_size=64 << 10), guard
        else:
            head = raw.read(4)
            kind = MAGIC.get(head[:2]) or MAGIC.get(head)
            if kind:
                raise DataError(f"{shard.uri}: holds {kind}-compressed data but its name does not end .{'gz' if kind == 'gzip' else 'zst'}")
            raw.seek(0)
            yield raw, None


def where(report: "DataReport", reject: dict) -> str:
    """'line 7', or 'line 7 of s3://b/data/part-1.jsonl' when the dataset has several shards."""
    return f"line {reject['line']}" + (f" of {reject['shard']}" if len(report.shards) > 1 else "")


def _parse(number: int, line: bytes | None, max_line_bytes: int) -> object:
    if line is None:
        raise RowError(f"line is longer than {max_line_bytes} bytes (QLORA_DATA__MAX_LINE_BYTES)")
    if number == 1 and line.startswith(BOM):
        line = line[len(BOM):]  # tolerated: editors on Windows add it
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowError(f"not valid UTF-8 (byte {error.start})") from None
    try:
        row = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
        # Valid JSON may still escape half of a surrogate pair ("\\ud800"): text no file, tokenizer or S3 object can hold.
        lone_surrogate = "\\u" in text and _has_lone_surrogate(row)
    except json.JSONDecodeError as error:
        raise RowError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise RowError("invalid JSON: nested too deeply") from None
    if lone_surrogate:
        raise RowError("holds a lone surrogate escape (\\ud800-\\udfff without its pair): not encodable as UTF-8")
    return row


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def validate_dataset(source: Path | list[Shard], out_dir: Path, *, max_line_bytes: int = 1 << 20,
                     system_prompt: str | None = None,
                     max_compression_ratio: float = DataSettings.model_fields["max_compression_ratio"].default) -> DataReport:
    """Check every row of every shard (or of one local JSONL file) in order; write accepted rows to
    out_dir/train.jsonl and rejects, naming shard and line, to out_dir/rejects.jsonl."""
    shards = [Shard(str(source), source, source.name)] if isinstance(source, Path) else source
    out_dir.mkdir(parents=True, exist_ok=True)
    report = DataReport(source=shards[0].uri if len(shards) == 1 else f"{len(shards)} shards",
                        train_path=out_dir / "train.jsonl", rejects_path=out_dir / "rejects.jsonl")
    weights = {shard.source: shard.weight for shard in shards}
    report.weights = [weights.get(source, 1.0) for source in range(max(weights) + 1)]
    with open(report.train_path, "w", encoding="utf-8") as train, open(report.rejects_path, "w", encoding="utf-8") as rejects:
        for index, shard in enumerate(shards):
            accepted, rejected = report.accepted, report.rejected
            _validate_shard(shard, index, report, train, rejects, max_line_bytes, system_prompt, max_compression_ratio)
            with open(shard.path, "rb") as f:  # file_digest reuses one 256 KiB buffer: memory stays bounded
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            report.shards.append({"uri": shard.uri, "sha256": sha256, "bytes": shard.path.stat().st_size,
                                  "accepted": report.accepted - accepted, "rejected": report.rejected - rejected, "weight": shard.weight})
    report.size_bytes = sum(s["bytes"] for s in report.shards)
    report.sha256 = report.shards[0]["sha256"] if len(shards) == 1 and shards[0].weight == 1 else _combined_sha256(shards, report.shards)
    return report


def _combined_sha256(shards: list[Shard], summaries: list[dict]) -> str:
    """One digest over every shard's name, bytes and weight: it changes when any of them does."""
    lines = (f"{s.source}:{s.name}:{summary['sha256']}:{s.weight}\n" for s, summary in zip(shards, summaries, strict=True))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _validate_shard(shard: Shard, index: int, report: DataReport, train, rejects, max_line_bytes: int, system_prompt: str | None,
                    max_compression_ratio: float) -> None:
    number = 0
    try:
        with _open_shard(shard, max_compression_ratio) as (f, guard):
            for number, line in _read_lines(f, max_line_bytes, guard):
                report.lines += 1
                if line is not None and not line.strip(BOM + b" \t\r\n"):
                    report.blank += 1
                    continue
                try:
                    kind, prompt, completion = convert_row(_parse(number, line, max_line_bytes), system_prompt)
                except RowError as error:
                    report.rejected += 1
                    reject = {"line": number, "reason": str(error), "shard": shard.uri}
                    rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
                    if len(report.first_rejects) < SHOWN_REJECTS:
                        report.first_rejects.append(reject)
                    continue
                report.accepted += 1
                report.formats[kind] += 1
                row = {"prompt": prompt, "completion": completion, "format": kind, "line": number, "shard": index, "source": shard.source}
                train.write(json.dumps(row, ensure_ascii=False) + "\n")
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{shard.uri}: corrupt gzip data after {number} lines: {error}") from None
    except OSError as error:
        raise DataError(f"cannot read dataset {shard.uri}: {error.strerror or error}") from None
    except zstandard.ZstdError as error:
        raise DataError(f"{shard.uri}: corrupt zstd data after {number} lines: {error}") from None
    except _Bomb as error:
        raise DataError(str(error)) from None


def check_report(report: DataReport, max_reject_ratio: float) -> None:
    """Raise a DataError when the dataset is empty or has more bad rows than allowed."""
    if report.accepted == 0:
        first = report.first_rejects[0] if report.first_rejects else None
        raise DataError(f"dataset has no usable rows ({report.rejected} rejected" + (f"; {where(report, first)}: {first['reason']})" if first else ")"))
    if report.reject_ratio > max_reject_ratio:
        first = report.first_rejects[0]
        raise DataError(
            f"{report.rejected} of {report.accepted + report.rejected} rows rejected ({report.reject_ratio:.1%} > "
            f"QLORA_DATA__MAX_REJECT_RATIO={max_reject_ratio}); first: {where(report, first)}: {first['reason']}"
        )


def _skipped(name: str) -> bool:
    """Spark's _SUCCESS, Hadoop's .crc files, _temporary/ folders, "folder/" placeholders: not data."""
    return not name or name.endswith("/") or any(part.startswith(("_", ".")) for part in name.split("/"))


def fetch_dataset(value: str, folder: Path) -> list[Shard]:
    """Download every shard a dataset setting names into folder, sources in the given order, each
    prefix's shards sorted by key (so a run reads the same rows in the same order every time)."""
    shards = []
    for source, (uri, weight) in enumerate(dataset_sources(value)):
        uris, is_prefix = storage.dataset_objects(uri)
        names = [u[len(uri.rstrip("/")) + 1:] if is_prefix else u.rsplit("/", 1)[-1] for u in uris]
        if is_prefix:
            names = [name for name in names if name and not name.endswith("/")]  # "folder/" placeholders hold nothing
            storage.checked_targets(uri, folder, names, DataError)  # shards land under numbered names; no key may climb anyway
            names = [name for name in names if not _skipped(name)]
            if not names:
                raise DataError(f"{uri}: no JSONL shards under this prefix (nothing to train on)")
            odd = next((name for name in names if not name.lower().endswith(SHARD_SUFFIXES)), None)
            if odd:
                raise DataError(f"{storage.join(uri, odd)}: not a JSONL shard (a dataset prefix holds *.jsonl, *.jsonl.gz or "
                                "*.jsonl.zst; names starting with _ or . are skipped)")
        for name in names:
            shard_uri = storage.join(uri, name) if is_prefix else uri
            path = storage.fetch_file(shard_uri, folder / f"{len(shards):05d}-{name.rsplit('/', 1)[-1]}")
            shards.append(Shard(shard_uri, path, name, source, weight))
    return shards


def fetch_inputs(settings: Settings, folder: Path) -> tuple[list[Shard], list[Shard] | None]:
    """Download the dataset (and the separate eval set, if any) into folder: (dataset, eval set or None)."""
    dataset = fetch_dataset(settings.dataset_uri, folder / "dataset")
    eval_set = fetch_dataset(settings.eval.dataset_uri, folder / "eval") if settings.eval.dataset_uri else None
    log.info("dataset fetched", shards=len(dataset), bytes=sum(shard.path.stat().st_size for shard in dataset))
    return dataset, eval_set


def validate(shards: list[Shard], uri: str, work: Path, data: DataSettings) -> DataReport:
    """Validate one dataset (its rejects logged) and check its share of bad rows."""
    report = validate_dataset(shards, work, max_line_bytes=data.max_line_bytes, system_prompt=data.system_prompt,
                              max_compression_ratio=data.max_compression_ratio)
    report.source = uri
    log.info("dataset validated", **{k: v for k, v in report.summary().items() if k not in ("first_rejects", "shards")},
             shards=len(report.shards))
    for reject in report.first_rejects[:5]:
        log.warning("rejected row", **reject)
    check_report(report, data.max_reject_ratio)
    return report


def validate_inputs(settings: Settings, inputs: tuple[list[Shard], list[Shard] | None], work: Path) -> tuple[DataReport, DataReport | None]:
    """Validate the dataset and the eval set; raise a DataError past the allowed share of bad rows."""
    dataset, eval_set = inputs
    report = validate(dataset, settings.dataset_uri, work, settings.data)
    if eval_set is None:
        return report, None
    return report, validate(eval_set, settings.eval.dataset_uri, work / "eval", settings.data)
