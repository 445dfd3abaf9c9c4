"""Dataset validation: stream the JSONL once, in bounded memory, check every row,
and write accepted rows in TRL's conversational prompt/completion form.

Accepted formats, one JSON object per line:
  {"instruction", "output"} (+ optional "input", "system")   the seed tutorial's
  {"messages": [{"role", "content"}, ...]}                   chat; the last turn is the answer
  {"prompt", "completion"}  strings or lists of messages     TRL's own
The prompt is the system and user turns, the completion the final assistant turn,
so TRL masks the prompt and the loss falls on the answer (and its end-of-turn token)."""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from job import storage
from job.errors import DataError
from job.logs import get_logger
from job.settings import Settings

log = get_logger(__name__)

ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {"instruction": ("instruction", "output"), "messages": ("messages",), "prompt": ("prompt", "completion")}
SHOWN_REJECTS = 20
BOM = b"\xef\xbb\xbf"


class RowError(ValueError):
    """Why one row was rejected (becomes a line in rejects.jsonl)."""


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
            "reject_ratio": round(self.reject_ratio, 6), "formats": dict(self.formats), "first_rejects": self.first_rejects,
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


def _read_lines(source: Path, max_line_bytes: int, digest):
    """Yield (line number, bytes or None when longer than max_line_bytes); never holds more than one line."""
    with open(source, "rb") as f:
        number = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            digest.update(line)
            number += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while True:  # drain the rest of the over-long line in bounded pieces
                    rest = f.readline(1 << 20)
                    digest.update(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield number, None
                continue
            yield number, line


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
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as error:
        raise RowError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise RowError("invalid JSON: nested too deeply") from None


def validate_dataset(source: Path, out_dir: Path, *, max_line_bytes: int = 1 << 20, system_prompt: str | None = None) -> DataReport:
    """Check every row of a JSONL file; write accepted rows to out_dir/train.jsonl and rejects to out_dir/rejects.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = DataReport(source=str(source), train_path=out_dir / "train.jsonl", rejects_path=out_dir / "rejects.jsonl")
    digest = hashlib.sha256()
    try:
        report.size_bytes = source.stat().st_size
        with open(report.train_path, "w", encoding="utf-8") as train, open(report.rejects_path, "w", encoding="utf-8") as rejects:
            for number, line in _read_lines(source, max_line_bytes, digest):
                report.lines = number
                if line is not None and not line.strip(BOM + b" \t\r\n"):
                    report.blank += 1
                    continue
                try:
                    kind, prompt, completion = convert_row(_parse(number, line, max_line_bytes), system_prompt)
                except RowError as error:
                    report.rejected += 1
                    reject = {"line": number, "reason": str(error)}
                    rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
                    if len(report.first_rejects) < SHOWN_REJECTS:
                        report.first_rejects.append(reject)
                    continue
                report.accepted += 1
                report.formats[kind] += 1
                train.write(json.dumps({"prompt": prompt, "completion": completion, "line": number}, ensure_ascii=False) + "\n")
    except OSError as error:
        raise DataError(f"cannot read dataset {source}: {error.strerror or error}") from None
    report.sha256 = digest.hexdigest()
    return report


def check_report(report: DataReport, max_reject_ratio: float) -> None:
    """Raise a DataError when the dataset is empty or has more bad rows than allowed."""
    if report.accepted == 0:
        first = f"; line {report.first_rejects[0]['line']}: {report.first_rejects[0]['reason']}" if report.first_rejects else ""
        raise DataError(f"dataset has no usable rows ({report.rejected} rejected{first})")
    if report.reject_ratio > max_reject_ratio:
        first = report.first_rejects[0]
        raise DataError(
            f"{report.rejected} of {report.accepted + report.rejected} rows rejected ({report.reject_ratio:.1%} > "
            f"QLORA_DATA__MAX_REJECT_RATIO={max_reject_ratio}); first: line {first['line']}: {first['reason']}"
        )


def fetch_inputs(settings: Settings, folder: Path) -> tuple[Path, Path | None]:
    """Download the dataset (and the separate eval set, if any) into folder: (dataset, eval set or None)."""
    dataset = storage.fetch_file(settings.dataset_uri, folder / "dataset.jsonl")
    eval_set = storage.fetch_file(settings.eval.dataset_uri, folder / "eval.jsonl") if settings.eval.dataset_uri else None
    log.info("dataset fetched", bytes=dataset.stat().st_size)
    return dataset, eval_set


def validate_inputs(settings: Settings, inputs: tuple[Path, Path | None], work: Path) -> tuple[DataReport, DataReport | None]:
    """Validate the dataset and the eval set; raise a DataError past the allowed share of bad rows."""
    dataset, eval_set = inputs
    data = settings.data
    report = validate_dataset(dataset, work, max_line_bytes=data.max_line_bytes, system_prompt=data.system_prompt)
    log.info("dataset validated", **{k: v for k, v in report.summary().items() if k != "first_rejects"})
    for reject in report.first_rejects[:5]:
        log.warning("rejected row", **reject)
    check_report(report, data.max_reject_ratio)
    if eval_set is None:
        return report, None
    eval_report = validate_dataset(eval_set, work / "eval", max_line_bytes=data.max_line_bytes, system_prompt=data.system_prompt)
    check_report(eval_report, data.max_reject_ratio)
    return report, eval_report
