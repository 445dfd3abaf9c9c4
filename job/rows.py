"""What training sees: the validated rows measured in tokens (over-length ones rejected or kept for
truncation), the eval rows held out, the sources weighted, one row per trained turn. The `rows` stage
of a run; `qlora-job plan` and the benches size runs from the same functions."""

from dataclasses import dataclass, field
from pathlib import Path

from job.data import DataReport
from job.errors import ConfigError, DataError
from job.logs import get_logger
from job.settings import Settings

log = get_logger(__name__)


@dataclass(frozen=True)
class Rows:
    """The rows stage's result: the datasets where every training process reads them, and their sizes."""

    train_dataset: Path  # datasets.save_to_disk folders of tokenizable prompt/completion rows
    eval_dataset: Path | None
    count: int
    mean_row_tokens: float
    longest_row_tokens: int  # sizes the largest micro-batch (plan.fit_to_card)


def prepare(settings: Settings, report: DataReport, eval_report: DataReport | None, tokenizer, work: Path) -> Rows:
    """Shape the validated rows as training sees them and save them under `work` (over-length rows join the
    report's rejects)."""
    dataset, eval_dataset, mean_row_tokens, longest_row_tokens = training_rows(settings, report, eval_report, tokenizer)
    for rows, folder in ((dataset, "train-dataset"), (eval_dataset, "eval-dataset")):
        if rows is not None:  # the sampling columns stay behind: the trainer reads prompt and completion
            rows.remove_columns([c for c in ("source", "format") if c in rows.column_names]).save_to_disk(str(work / folder))
    log.info("rows ready", rows=len(dataset), eval_rows=len(eval_dataset) if eval_dataset is not None else 0,
             mean_row_tokens=mean_row_tokens, longest_row_tokens=longest_row_tokens)
    return Rows(train_dataset=work / "train-dataset", eval_dataset=work / "eval-dataset" if eval_dataset is not None else None,
                count=len(dataset), mean_row_tokens=mean_row_tokens, longest_row_tokens=longest_row_tokens)


@dataclass
class Overlength:
    """Rows longer than max_seq_length: rejected (as reject records) or kept for truncation."""

    rejects: list[dict] = field(default_factory=list)
    truncated: int = 0
    tokens: int = 0  # of every row measured, the long ones included
    longest: int = 0


def drop_overlength(dataset, tokenizer, max_length: int, mode: str) -> tuple[object, Overlength]:
    """Measure every row in tokens; rows over max_length are dropped as rejects or, with mode
    "truncate", kept (the trainer truncates them)."""

    def measure(batch):  # rendered, then tokenized a batch at a time: the Rust tokenizer spreads it over the cores
        texts = tokenizer.apply_chat_template([p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)], tokenize=False)
        return {"n_tokens": [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}

    dataset = dataset.map(measure, batched=True, batch_size=1000, desc="Measuring rows")
    lengths = dataset["n_tokens"]
    measured = {"tokens": sum(lengths), "longest": max(lengths, default=0)}
    long_rows = dataset.filter(lambda row: row["n_tokens"] > max_length)
    if not len(long_rows):
        return dataset, Overlength(**measured)
    if mode != "reject":
        return dataset, Overlength(truncated=len(long_rows), **measured)
    rejects = [{"line": row["line"], "reason": f"{row['n_tokens']} tokens is longer than QLORA_MODEL__MAX_SEQ_LENGTH={max_length}",
                "shard": row.get("shard")} for row in long_rows]
    return dataset.filter(lambda row: row["n_tokens"] <= max_length), Overlength(rejects=rejects, **measured)


def expand_turns(dataset, train_turns: str):
    """With train_turns "all", a messages row with earlier assistant turns becomes one row per assistant turn:
    the conversation up to that turn as the prompt, the turn as the completion. TRL masks each as it masks
    any prompt/completion row, so every turn is trained once, in the form the model produces it, after the
    history as the chat template renders it at inference (Qwen3's drops the empty think block of earlier
    turns). The cost: a turn's history is read again for each later turn. An assistant turn with no user
    turn before it (a greeting) stays context."""
    if train_turns != "all" or "format" not in dataset.column_names:
        return dataset

    def split(batch):
        out = {key: [] for key in batch}
        for i, prompt in enumerate(batch["prompt"]):
            turns = [j for j, m in enumerate(prompt) if m["role"] == "assistant" and any(u["role"] == "user" for u in prompt[:j])]
            for j in turns if batch["format"][i] == "messages" else []:
                for key in batch:
                    out[key].append(batch[key][i])
                out["prompt"][-1], out["completion"][-1] = prompt[:j], [prompt[j]]
            for key in batch:
                out[key].append(batch[key][i])
        return out

    return dataset.map(split, batched=True, desc="One row per assistant turn")


def load_train_dataset(report: DataReport, tokenizer, settings: Settings):
    """The report's accepted rows as a datasets.Dataset, over-length rows rejected into the report (or
    kept for truncation). Returns (dataset, mean tokens a row, the longest kept row's tokens)."""
    from datasets import load_dataset

    cache = report.train_path.parent / "hf-datasets"
    dataset = load_dataset("json", data_files=str(report.train_path), split="train", cache_dir=str(cache))
    dataset, overlength = drop_overlength(dataset, tokenizer, settings.model.max_seq_length, settings.data.overlength)
    for reject in overlength.rejects:  # rows name their shard by index; rejects by URI
        reject["shard"] = report.shards[reject["shard"]]["uri"] if report.shards and reject["shard"] is not None else None
    report.add_rejects(overlength.rejects)
    report.truncated += overlength.truncated
    report.tokens, report.longest_row_tokens = overlength.tokens, overlength.longest
    report.overlength_rows = len(overlength.rejects) + overlength.truncated
    lengths = dataset["n_tokens"]
    mean_tokens = round(sum(lengths) / len(lengths), 1) if lengths else 0.0
    columns = [c for c in ("line", "n_tokens", "shard") if c in dataset.column_names]
    return dataset.remove_columns(columns), mean_tokens, max(lengths, default=0)


def mix_sources(dataset, weights: list[float], seed: int):
    """Weight the dataset's sources by repeating rows: a weight of 2 trains each row of its source twice
    an epoch, 0.5 a seeded half of them, 1.5 every row once and a seeded half again. Eval rows are held
    out before mixing, so the eval set is never weighted."""
    if "source" not in dataset.column_names:
        return dataset
    if any(weight != 1 for weight in weights):
        import random

        rng, indices, sources = random.Random(seed), [], dataset["source"]
        for source, weight in enumerate(weights):
            rows = [i for i, s in enumerate(sources) if s == source]
            whole, part = divmod(weight, 1)
            indices += rows * int(whole) + rng.sample(rows, round(part * len(rows)))
        if not indices:
            raise DataError(f"no row left after weighting the dataset's sources by {weights}")
        log.info("dataset mixed", weights=weights, rows_before=len(dataset), rows_after=len(indices),
                 rows_per_source=[sum(1 for i in indices if sources[i] == s) for s in range(len(weights))])
        dataset = dataset.select(sorted(indices))
    return dataset.remove_columns("source")


def split_eval(dataset, fraction: float, seed: int):
    """Hold out a deterministic share of the rows for evaluation; (dataset, None) when fraction is 0."""
    if not fraction:
        return dataset, None
    held = round(len(dataset) * fraction)
    if held < 1 or held >= len(dataset):
        raise ConfigError(f"QLORA_EVAL__FRACTION={fraction} of {len(dataset)} rows leaves no evaluation or no training row")
    split = dataset.train_test_split(test_size=held, seed=seed, shuffle=True)
    return split["train"], split["test"]


def training_rows(settings: Settings, report: DataReport, eval_report: DataReport | None, tokenizer):
    """The validated rows as training sees them (train.prepare, and `qlora-job plan`'s sizing): measured, over-length
    rows rejected into the report (or kept), the eval rows held out (or the separate eval set loaded), the sources
    weighted, one row per trained turn. Returns (train rows, eval rows or None, mean tokens a row before expanding, the
    longest row's tokens: expanding and weighting make no row longer)."""
    from job import data

    dataset, mean_row_tokens, longest_row_tokens = load_train_dataset(report, tokenizer, settings)
    data.check_report(report, settings.data.max_reject_ratio)
    if eval_report is not None:
        eval_dataset, _, _ = load_train_dataset(eval_report, tokenizer, settings)
    else:
        dataset, eval_dataset = split_eval(dataset, settings.eval.fraction, settings.train.seed)
    dataset = expand_turns(mix_sources(dataset, report.weights, settings.train.seed), settings.data.train_turns)
    if eval_dataset is not None:  # held out whole conversations before expanding: no turn of one is trained on
        eval_dataset = expand_turns(eval_dataset, settings.data.train_turns)
    return dataset, eval_dataset, mean_row_tokens, longest_row_tokens


