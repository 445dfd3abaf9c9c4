"""Training: TRL's SFTTrainer on conversational prompt/completion rows, so the
prompt is masked and the answer plus its end-of-turn token carry the loss."""

import contextlib
import gc
import itertools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from job import checkpoint
from job.errors import ConfigError, DataError, NonFiniteLoss, OutOfMemory, Terminated, VerifyError
from job.logs import get_logger
from job.observe import check_report_to
from job.settings import Settings

log = get_logger(__name__)
IGNORE = -100  # label value that the loss skips
SEED_ROWS_PER_STEP, SEED_LEARNING_RATE = 8, 2e-4  # the tutorial: 2 rows x 4 accumulation at 2e-4


def _optimizer(name: str | None, recipe: str, cuda: bool) -> str:
    """Unset: the seed's adamw_8bit; for the fast recipe torch's fused AdamW, one kernel for all LoRA
    weights (8-bit states save ~60 MB on 10M LoRA weights but cost a tenth of each step's GPU time)."""
    import importlib.util

    if name is None:
        name = "adamw_8bit" if recipe == "seed" else ("adamw_torch_fused" if cuda else "adamw_torch")
    if "8bit" in name and not (cuda and importlib.util.find_spec("bitsandbytes")):
        log.warning("8-bit optimizer needs bitsandbytes on CUDA; using adamw_torch", requested=name)
        return "adamw_torch"
    return name


def batch_plan(settings: Settings, engine: str, mean_row_tokens: float | None = None, world_size: int = 1,
               dataset_rows: int | None = None, cuda: bool = False) -> dict:
    """Rows per micro-batch, micro-batches per step, packing and sampling, for the chosen recipe.

    seed: 2 rows x 4 micro-batches, padded, in random order (the tutorial). fast: one micro-batch
    per optimizer step holding about micro_batch_tokens tokens, rows of similar length batched
    together so little is padding. At this model size each step costs ~0.2 s of fixed overhead
    (kernel launches, Python), so fewer, fuller steps are what makes training fast.
    Packing stays off unless asked for: without FlashAttention-2 or xformers, a padding-free packed
    micro-batch is attended as one long sequence, and its cost grows with the square of its length
    (measured on an H100: 16k tokens 0.9 s a step, 64k tokens 5.8 s; bench/RESULTS.md)."""
    train = settings.train
    seed = train.recipe == "seed"
    packing = bool(train.packing)
    if seed:
        per_device = train.per_device_batch_size or 2
    elif packing:
        # 16,384 tokens / 2,048 per packed sequence = 8 sequences per micro-batch
        per_device = train.per_device_batch_size or max(1, train.micro_batch_tokens // settings.model.max_seq_length)
    else:
        # 16,384 tokens / ~580 tokens a row = 28 rows per micro-batch
        per_device = train.per_device_batch_size or max(1, int(train.micro_batch_tokens // max(mean_row_tokens or 512, 1)))
    if dataset_rows and not train.per_device_batch_size:  # a micro-batch never holds more rows than there are
        per_device = min(per_device, max(1, math.ceil(dataset_rows / world_size)))
    accumulation = train.gradient_accumulation_steps or (4 if seed else 1)
    sampling = "group_by_length" if not seed and not packing else "random"
    # Every new micro-batch length costs a cuDNN attention plan the first time it is seen (steps of
    # 0.33-0.46 s instead of ~0.25 s on an H200; under DDP the other rank waits). Lengths padded to a
    # multiple of 64 repeat early, for a few percent more padding on a GPU that mostly waits anyway.
    pad_to = train.pad_to_multiple_of or (64 if cuda and not seed and not packing else None)
    # Fewer, larger steps see the same tokens in fewer updates: unless set, the learning rate grows
    # with the rows a step, up to 4x (measured on an H200 at equal tokens against the seed recipe:
    # 2e-4 +4.2% loss, square-root rule 3.8e-4 +3.0%, 8e-4 +1.3%; bench/RESULTS.md),
    # and warm-up covers the same rows as the seed's 5 steps of 8.
    rows_per_step = per_device * accumulation * world_size
    if packing:
        rows_per_step *= max(1, settings.model.max_seq_length // max(int(mean_row_tokens or 512), 1))
    scale = 1.0 if seed else min(4.0, max(1.0, rows_per_step / SEED_ROWS_PER_STEP))
    learning_rate = train.learning_rate or SEED_LEARNING_RATE * scale
    warmup = train.warmup_steps if train.warmup_steps is not None else (
        5 if seed else max(1, math.ceil(5 * SEED_ROWS_PER_STEP / rows_per_step)))
    return {"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation, "packing": packing,
            "sampling": sampling, "pad_to_multiple_of": pad_to, "world_size": world_size, "rows_per_step": rows_per_step,
            "learning_rate": learning_rate, "warmup_steps": warmup}


def sft_config(settings: Settings, output_dir: Path, cuda: bool, plan: dict | None = None):
    """Trainer arguments from settings: the seed tutorial's hyperparameters, the batch plan's shape
    (default: batch_plan for the transformers engine)."""
    import torch
    from trl import SFTConfig

    train = settings.train
    plan = plan or batch_plan(settings, "transformers")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=plan["per_device_batch_size"],
        gradient_accumulation_steps=plan["gradient_accumulation_steps"],
        warmup_steps=plan["warmup_steps"],
        max_steps=train.max_steps,
        learning_rate=plan["learning_rate"],
        lr_scheduler_type=train.lr_scheduler_type,
        optim=_optimizer(train.optim, train.recipe, cuda),
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # the default hides a NaN loss from the logs; we stop on it
        max_length=settings.model.max_seq_length,
        truncation_mode="keep_start",
        packing=plan["packing"],
        padding_free=plan["packing"],
        pad_to_multiple_of=plan["pad_to_multiple_of"],
        train_sampling_strategy=plan["sampling"],
        dataloader_num_workers=2 if cuda else 0,  # collation off the training thread
        dataloader_pin_memory=cuda,
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",  # saves are driven by the checkpoint callback (schedule, SIGTERM)
        save_total_limit=settings.checkpoint.keep,
        report_to=check_report_to(settings.metrics.report_to),
        per_device_eval_batch_size=plan["per_device_batch_size"],
        eval_strategy="no",  # evaluated once before and once after training, by train_adapter
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; the search costs a pass
        ddp_broadcast_buffers=False,  # the only buffers are rotary tables, equal on every rank: no broadcast each forward
        disable_tqdm=not sys.stdout.isatty(),
        dataset_num_proc=None,
    )


def drop_overlength(dataset, tokenizer, max_length: int, mode: str, rejects_path: Path) -> tuple[object, int, int]:
    """Reject (appending to rejects.jsonl) or keep-for-truncation rows longer than max_length tokens.
    Returns (dataset, rejected count, truncated count, the first rejects)."""

    def measure(row):
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
        return {"n_tokens": len(ids)}

    dataset = dataset.map(measure, desc="Measuring rows")
    long_rows = dataset.filter(lambda row: row["n_tokens"] > max_length)
    rejected, truncated, first = 0, 0, []
    if len(long_rows) and mode == "reject":
        with open(rejects_path, "a", encoding="utf-8") as f:
            for row in long_rows:
                reject = {"line": row["line"], "reason": f"{row['n_tokens']} tokens is longer than QLORA_MODEL__MAX_SEQ_LENGTH={max_length}"}
                f.write(json.dumps(reject) + "\n")
                if len(first) < 20:
                    first.append(reject)
        rejected = len(long_rows)
        dataset = dataset.filter(lambda row: row["n_tokens"] <= max_length)
    else:
        truncated = len(long_rows)
    return dataset, rejected, truncated, first


def check_labels(trainer, eos_token_id: int) -> dict:
    """First-batch self-check: prompt tokens masked, answer tokens trained, end-of-turn trained."""
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    trained = labels[labels != IGNORE]
    result = {"masked": int((labels == IGNORE).sum()), "trained": int(trained.numel()), "eos_trained": int((trained == eos_token_id).sum())}
    if result["masked"] == 0:
        raise DataError("label check failed: no prompt token is masked, the model would learn to echo prompts")
    if result["trained"] == 0:
        raise DataError("label check failed: no answer token is trained (is every answer truncated away?)")
    if result["eos_trained"] == 0:
        raise DataError("label check failed: the end-of-turn token is never trained, generation would not stop")
    return result


def _progress_callback(state_holder: dict, on_progress=None):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Logs step, loss, lr, tokens/s and ETA (and hands them to on_progress, e.g. the Pushgateway);
        stops training on a non-finite loss."""

        def on_train_begin(self, args, state, control, **kwargs):
            state_holder["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            state_holder["steps"].append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return  # the loss is already averaged over DDP workers: every rank sees the same value
            elapsed = time.perf_counter() - state_holder["start"]
            loss = float(logs["loss"])
            state_holder["curve"].append(
                {"step": state.global_step, "tokens": int(state.num_input_tokens_seen), "loss": loss, "lr": logs.get("learning_rate")}
            )
            grad_norm = logs.get("grad_norm")
            if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                state_holder["non_finite"] = (state.global_step, loss, grad_norm)
                control.should_training_stop = True
            per_step = elapsed / max(state.global_step, 1)
            if not state.is_world_process_zero:
                return
            tokens_per_s = state.num_input_tokens_seen / elapsed if elapsed else None
            eta_s = per_step * (state.max_steps - state.global_step)
            log.info(
                "progress", step=state.global_step, max_steps=state.max_steps, loss=round(loss, 4),
                lr=logs.get("learning_rate"), grad_norm=grad_norm,
                tokens_per_s=round(tokens_per_s) if tokens_per_s else None, eta_s=round(eta_s, 1),
            )
            if on_progress is not None:
                on_progress(step=state.global_step, max_steps=state.max_steps, loss=loss,
                            tokens_per_second=tokens_per_s, eta_seconds=eta_s)

    return Progress()


def load_train_dataset(train_path: Path, rejects_path: Path, tokenizer, settings: Settings):
    """The validated rows as a datasets.Dataset, over-length rows rejected or marked for truncation.
    Returns (dataset, stats: rejected, truncated, mean_row_tokens)."""
    from datasets import load_dataset

    cache = train_path.parent / "hf-datasets"
    dataset = load_dataset("json", data_files=str(train_path), split="train", cache_dir=str(cache))
    dataset, rejected, truncated, first = drop_overlength(
        dataset, tokenizer, settings.model.max_seq_length, settings.data.overlength, rejects_path
    )
    mean_tokens = sum(dataset["n_tokens"]) / len(dataset) if len(dataset) else 0.0
    stats = {"rejected": rejected, "truncated": truncated, "mean_row_tokens": round(mean_tokens, 1), "first_rejects": first}
    return dataset.remove_columns(["line", "n_tokens"]), stats


def split_eval(dataset, fraction: float, seed: int):
    """Hold out a deterministic share of the rows for evaluation; (dataset, None) when fraction is 0."""
    if not fraction:
        return dataset, None
    held = round(len(dataset) * fraction)
    if held < 1 or held >= len(dataset):
        raise ConfigError(f"QLORA_EVAL__FRACTION={fraction} of {len(dataset)} rows leaves no evaluation or no training row")
    split = dataset.train_test_split(test_size=held, seed=seed, shuffle=True)
    return split["train"], split["test"]


def check_eval(metrics: dict, require_improvement: bool) -> None:
    """The optional eval gate: held-out loss after training must be below the loss before it."""
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    if require_improvement and not after < before:
        raise VerifyError(f"eval loss did not improve: {before:.4f} before training, {after:.4f} after "
                          "(QLORA_EVAL__REQUIRE_IMPROVEMENT=true)")


def steady_tokens_per_second(steps: list[tuple[float, int]]) -> float | None:
    """Tokens/s after warm-up (compilation, allocator growth): skip the first quarter of steps, at most 10."""
    skip = max(1, min(10, len(steps) // 4))
    if len(steps) <= skip:
        return None
    (t0, n0), (t1, n1) = steps[skip - 1], steps[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


@contextlib.contextmanager
def _timed_gc(pauses: list):
    """Record Python's garbage collections while training: a full pass over a large heap can stall a
    step, and under DDP every rank waits for it (measured on an H200: 6-7 full collections in a
    50-step run, the longest 0.6-0.7 s; the 1.5 s DDP stalls were Triton recompiles, job/engine.py)."""
    started = []

    def timer(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append((info["generation"], time.perf_counter() - started.pop()))

    gc.callbacks.append(timer)
    try:
        yield
    finally:
        gc.callbacks.remove(timer)


def _step_seconds(start: float, steps: list[tuple[float, int]]) -> list[float]:
    """Wall time of each optimizer step (the first includes compilation): where stalls show."""
    ends = [start] + [t for t, _ in steps]
    return [round(b - a, 3) for a, b in itertools.pairwise(ends)]


def train_adapter(model, tokenizer, dataset, adapter_dir: Path, settings: Settings, engine: str = "transformers",
                  mean_row_tokens: float | None = None, run_uri: str | None = None, resume_from: Path | None = None,
                  extra_callbacks: tuple = (), eval_dataset=None, on_progress=None) -> dict:
    """Fine-tune the LoRA adapters on the dataset, save them to adapter_dir, and return metrics.
    With run_uri, checkpoints go to <run_uri>/checkpoints/ (on schedule and on SIGTERM, then exit 143);
    resume_from continues a checkpoint (optimizer, scheduler, RNG, step). Under torchrun (DDP) every
    worker calls this; global rank 0 logs progress, uploads checkpoints and saves the adapter."""
    import torch
    from trl import SFTTrainer

    cuda = torch.cuda.is_available()
    work = adapter_dir.parent
    holder: dict = {"curve": [], "steps": [], "non_finite": None, "start": time.perf_counter()}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plan = batch_plan(settings, engine, mean_row_tokens, world_size, len(dataset), cuda)
    args = sft_config(settings, work / "checkpoints", cuda, plan)
    log.info("batch plan", recipe=settings.train.recipe, mean_row_tokens=mean_row_tokens, **plan)
    stop = checkpoint.StopRequest()
    callbacks = [_progress_callback(holder, on_progress), *extra_callbacks]
    if run_uri is not None:
        cp = settings.checkpoint
        callbacks.append(checkpoint.checkpoint_callback(stop, run_uri, cp.every_steps, cp.every_minutes, cp.keep))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, eval_dataset=eval_dataset, args=args,
                         callbacks=callbacks)
    # Our Progress callback logs through structlog; the Trainer's own printer would duplicate it as dicts.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    labels = check_labels(trainer, tokenizer.eos_token_id)
    log.info("label check passed", **labels)

    eval_before = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    if run_uri is not None:
        stop.install()
    pauses: list[tuple[int, float]] = []
    try:
        with _timed_gc(pauses):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        raise OutOfMemory(
            f"out of GPU memory at step {trainer.state.global_step}: lower QLORA_TRAIN__PER_DEVICE_BATCH_SIZE "
            f"(now {settings.train.per_device_batch_size}) or QLORA_MODEL__MAX_SEQ_LENGTH"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    seconds = time.perf_counter() - started
    if stop.signal is not None:
        raise Terminated(f"stopped by {signal.Signals(stop.signal).name} at step {trainer.state.global_step}; "
                         "checkpoint uploaded, a retry of this run resumes from it")
    if holder["non_finite"]:
        step, loss, grad_norm = holder["non_finite"]
        raise NonFiniteLoss(
            f"non-finite loss {loss} (grad norm {grad_norm}) at step {step}: lower QLORA_TRAIN__LEARNING_RATE or check the data"
        )

    eval_after = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None
    if trainer.is_world_process_zero():
        adapter_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter_dir))

    curve = holder["curve"]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume_from.name if resume_from else None,
        "rows": len(dataset),
        "loss_first": curve[0]["loss"] if curve else None,
        "loss_last": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
        "eval_rows": len(eval_dataset) if eval_dataset is not None else 0,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "train_tokens": tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "steady_tokens_per_second": round(steady, 1) if (steady := steady_tokens_per_second(holder["steps"])) else None,
        "tokens_per_step": round(tokens / max(trainer.state.global_step, 1)),
        "step_seconds": _step_seconds(holder["start"], holder["steps"]),
        "gc_pauses": {"collections": len(pauses), "full": sum(g == 2 for g, _ in pauses),
                      "seconds": round(sum(t for _, t in pauses), 3), "longest_s": round(max((t for _, t in pauses), default=0), 3)},
        "batch_plan": plan,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
        "label_check": labels,
    }
