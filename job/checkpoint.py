"""Checkpoints: preemption-safe training.

On SIGTERM or SIGINT training stops at the end of the current step, the Trainer saves a
checkpoint (adapter, optimizer, scheduler, RNG state, step; the data position follows from
the step), it is uploaded under <run_id>/checkpoints/, and the run exits 143. Checkpoints are
also saved and uploaded every N steps or M minutes, keeping the newest K. A restarted pod
resumes from the newest uploaded checkpoint that validates, falling back to older ones.

Each uploaded checkpoint ends with a COMPLETE marker, written last: one without it is ignored.

With evaluations during training, the adapter of the lowest eval loss so far is kept in a folder beside
the checkpoints and travels inside each one as two files (best-adapter.safetensors, best-adapter.json), so a
resumed run still knows it. Not as a folder: the Trainer reads any checkpoint subfolder holding adapter weights
as a second adapter and then leaves the trained one at its initial weights."""

import json
import math
import re
import shutil
import signal
import time
from pathlib import Path

from job import storage
from job.logs import get_logger

log = get_logger(__name__)
MARKER = "COMPLETE"
NAME = re.compile(r"^checkpoint-(\d+)$")
REQUIRED = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json")
BEST_INFO = "best.json"  # {step, eval_loss} of the best adapter, beside its weights in the best folder
WEIGHTS = "adapter_model.safetensors"
IN_CHECKPOINT = {WEIGHTS: "best-adapter.safetensors", BEST_INFO: "best-adapter.json"}  # best folder -> checkpoint


def checkpoints_uri(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


def _remote_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(step, name) of uploaded checkpoints that have their COMPLETE marker, newest first."""
    complete = set()
    for key in storage.list_keys(checkpoints_uri(run_uri)):
        name, _, rest = key.partition("/")
        if rest == MARKER and (match := NAME.match(name)):
            complete.add((int(match.group(1)), name))
    return sorted(complete, reverse=True)


def valid_checkpoint(folder: Path) -> bool:
    """Whether a downloaded checkpoint can be resumed: its files are there, trainer_state.json parses to a positive
    step, and the adapter's safetensors header reads."""
    from safetensors import SafetensorError, safe_open

    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as tensors:
            next(iter(tensors.keys()))
        return all((folder / name).exists() for name in REQUIRED) and type(state["global_step"]) is int and state["global_step"] > 0
    except (OSError, ValueError, KeyError, TypeError, StopIteration, RuntimeError, RecursionError, SafetensorError):
        # TypeError: state is not an object; SafetensorError: a header cut short (a partial upload or download)
        return False


def fetch_latest_checkpoint(run_uri: str, work: Path) -> Path | None:
    """Download the newest uploaded checkpoint of this run that validates; None when there is none."""
    for step, name in _remote_checkpoints(run_uri):
        local = work / "resume" / name
        storage.fetch_prefix(storage.join(checkpoints_uri(run_uri), name), local)
        if valid_checkpoint(local):
            log.info("resuming from checkpoint", checkpoint=name, step=step)
            return local
        log.warning("checkpoint does not validate; trying an older one", checkpoint=name)
    return None


def upload_checkpoint(folder: Path, run_uri: str, keep: int) -> None:
    """Upload a local checkpoint folder, marker last, then drop uploaded ones beyond the newest `keep`."""
    target = storage.join(checkpoints_uri(run_uri), folder.name)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.put_file(path, storage.join(target, path.relative_to(folder).as_posix()))
    storage.put_if_absent(b"", storage.join(target, MARKER))
    log.info("checkpoint uploaded", checkpoint=folder.name)
    for _, name in _remote_checkpoints(run_uri)[keep:]:
        storage.delete_prefix(storage.join(checkpoints_uri(run_uri), name))


def delete_checkpoints(run_uri: str) -> None:
    """After the manifest is written the checkpoints are dead weight; removing them is best effort."""
    from job.errors import StorageError

    try:
        storage.delete_prefix(checkpoints_uri(run_uri))
    except StorageError as error:
        log.warning("could not delete the run's checkpoints", error=str(error))


class StopRequest:
    """Set by SIGTERM/SIGINT; training checks it at the end of every step."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signal is None:
            log.warning("stop requested; finishing the current step and saving a checkpoint", signal=signal.Signals(signum).name)
        self.signal = signum

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


def _any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag true if any DDP worker has it true: all workers must save, and stop, at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flags
    import torch

    values = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def checkpoint_callback(stop: StopRequest, run_uri: str, every_steps: int, every_minutes: float, keep: int,
                        best_dir: Path | None = None):
    """A TrainerCallback that saves on a stop request or on schedule, and uploads each save (with the best
    adapter so far from best_dir, when there is one)."""
    from transformers import TrainerCallback

    class Checkpointing(TrainerCallback):
        def __init__(self):
            self.last_save = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due_steps = every_steps and state.global_step % every_steps == 0
            stopping, due_time = _any_rank(
                [stop.signal is not None, bool(every_minutes and time.monotonic() - self.last_save >= every_minutes * 60)], args.device)
            if stopping:
                control.should_save = True
                control.should_training_stop = True
            elif (due_steps or due_time) and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if best_dir is not None and (best_dir / BEST_INFO).exists():
                    for name, stored in IN_CHECKPOINT.items():
                        shutil.copyfile(best_dir / name, folder / stored)
                upload_checkpoint(folder, run_uri, keep)

    return Checkpointing()


def read_best(folder: Path) -> dict | None:
    """{step, eval_loss} of the best adapter kept in folder; None when there is none, or when best.json is not
    one this job wrote (a checkpoint is read back from the bucket: its best is then no candidate)."""
    if not (folder / BEST_INFO).exists():
        return None
    try:
        best = json.loads((folder / BEST_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        best = None
    if not (isinstance(best, dict) and type(best.get("step")) is int and type(best.get("eval_loss")) in (int, float)):
        log.warning("the checkpoint's best-adapter record is not one this job wrote; it is ignored", folder=str(folder))
        return None
    return best


def best_adapter_callback(folder: Path, resume_from: Path | None):
    """A TrainerCallback that saves the adapter into `folder` whenever an evaluation during training finds a
    new lowest eval loss (global rank 0 writes; every rank keeps the same record). A resumed run starts from
    the best recorded in its checkpoint. `.best` is {step, eval_loss}, or None before the first evaluation."""
    from transformers import TrainerCallback

    shutil.rmtree(folder, ignore_errors=True)  # a best of an earlier attempt that left no checkpoint is no candidate
    if resume_from is not None and (resume_from / IN_CHECKPOINT[BEST_INFO]).exists():
        folder.mkdir(parents=True)
        for name, stored in IN_CHECKPOINT.items():
            shutil.copyfile(resume_from / stored, folder / name)
    resumed_best = read_best(folder)
    if resumed_best is None:  # weights without a record this job wrote are no candidate either
        shutil.rmtree(folder, ignore_errors=True)

    class BestAdapter(TrainerCallback):
        def __init__(self):
            self.best = resumed_best

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or state.global_step == 0 or not math.isfinite(loss):
                return  # the evaluation before training is the base line, not a candidate
            if self.best is not None and loss >= self.best["eval_loss"]:
                return
            self.best = {"step": state.global_step, "eval_loss": float(loss)}
            if state.is_world_process_zero:
                model.save_pretrained(str(folder), safe_serialization=True)
                (folder / BEST_INFO).write_text(json.dumps(self.best))
                log.info("best adapter so far", **self.best)

    return BestAdapter()
