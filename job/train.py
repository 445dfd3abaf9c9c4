"""Training: TRL's SFTTrainer on conversational prompt/completion rows, so the prompt is masked and
the answer plus its end-of-turn token carry the loss.

One entry for 1..N GPUs: `prepare` turns the shaped rows (job/rows.py) into a TrainSpec, the one value
that crosses the process boundary; `run_training` calls `train(spec)` in this process for one training
process, or hands the same spec, serialised, to torchrun's launcher, whose workers call `train`."""

import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from job import chat, checkpoint, compile_cache, distributed
from job import plan as planning
from job.errors import DataError, NonFiniteLoss, OutOfMemory, Terminated, VerifyError
from job.logs import get_logger
from job.observe import check_report_to
from job.rows import Rows
from job.settings import Settings

log = get_logger(__name__)
IGNORE = -100  # label value that the loss skips
SECRET_FIELDS = {"hf_token"}  # never written into the spec: workers inherit them from the pod's environment


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training process needs, and the only thing handed to it."""

    settings: Settings
    engine: str
    model_source: str  # a local folder or hub id (s3:// models are fetched before)
    train_dataset: Path  # datasets.save_to_disk folders, tokenizable rows
    eval_dataset: Path | None
    mean_row_tokens: float
    adapter_dir: Path  # where global rank 0 saves the adapter
    checkpoint_dir: Path
    run_id: str
    run_uri: str  # checkpoints are uploaded under it
    resume_from: Path | None
    metrics_path: Path  # a worker's rank 0 writes its TrainMetrics here
    errors_dir: Path  # each worker's one-line cause and exit code, read back by the launching process
    init_adapter: Path | None = None  # a warm start's parent adapter (warmstart.fetch_parent), loaded unless resuming
    longest_row_tokens: int = 0  # sizes the largest micro-batch (plan.fit_to_card); 0: max_seq_length

    def to_json(self) -> str:
        values = {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items() if k != "settings"}
        values["settings"] = json.loads(self.settings.model_dump_json(exclude=SECRET_FIELDS))
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        values = json.loads(text)
        secrets = {name: os.environ.get(f"QLORA_{name.upper()}") for name in SECRET_FIELDS}
        values["settings"] = Settings.model_validate({**values["settings"], **secrets})
        paths = {name for name, f in cls.__dataclass_fields__.items() if "Path" in str(f.type)}
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in values.items()})


@dataclass
class TrainMetrics:
    """What training reports; metrics.json holds these keys at its top level."""

    engine: str
    steps: int
    resumed_from: str | None
    rows: int
    mean_row_tokens: float
    loss_first: float | None
    loss_last: float | None
    loss_curve: list[dict]
    eval_rows: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_tokens: int
    train_seconds: float
    tokens_per_second: float | None
    steady_tokens_per_second: float | None
    tokens_per_step: int
    step_seconds: list[float]
    batch_plan: dict
    peak_gpu_memory_gib: float | None
    world_size: int
    cpu_threads: int
    label_check: dict
    model_load_s: float = 0.0
    duration: dict = field(default_factory=dict)  # plan.Duration: epochs and steps asked for and planned
    epochs_trained: float | None = None  # the Trainer's epoch counter at the end (1.0 = every row once)
    eval_curve: list[dict] = field(default_factory=list)  # {step, tokens, eval_loss}: before, during and after training
    best: dict | None = None  # {step, eval_loss} of the adapter kept, with evaluations during training
    stopped_early: bool = False  # early stopping ended training before its planned steps
    first_step_at_s: float | None = None  # seconds from this process's start to the end of its first optimizer step
    memory_fit: dict | None = None  # plan.MemoryFit: what the run chose for its card, with the estimated peak
    estimated_train_seconds: float | None = None  # the time model's figure for the steps and tokens trained (GPU runs)

    def as_dict(self) -> dict:
        return asdict(self)


def _optimizer(name: str | None, recipe: str, cuda: bool) -> str:
    """Unset: the seed's adamw_8bit; for the fast recipe torch's fused AdamW, one kernel for all LoRA
    weights (8-bit states save little memory on a few million LoRA weights and cost step time)."""
    import importlib.util

    if name is None:
        name = "adamw_8bit" if recipe == "seed" else ("adamw_torch_fused" if cuda else "adamw_torch")
    if "8bit" in name and not (cuda and importlib.util.find_spec("bitsandbytes")):
        log.warning("8-bit optimizer needs bitsandbytes on CUDA; using adamw_torch", requested=name)
        return "adamw_torch"
    return name


def sft_config(settings: Settings, output_dir: Path, cuda: bool, plan: planning.BatchPlan | None = None, steps: int | None = None):
    """Trainer arguments: the seed tutorial's hyperparameters in the batch plan's shape, for `steps` optimizer
    steps (train() sets the run's exact count from the data loader once the trainer has built it)."""
    import torch
    from trl import SFTConfig

    train = settings.train
    plan = plan or planning.batch_plan(settings.train, settings.model.max_seq_length)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        warmup_steps=plan.warmup_steps,
        max_steps=steps or train.max_steps or planning.SEED_MAX_STEPS,
        learning_rate=plan.learning_rate,
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
        # Checkpointing is the load's choice (engine.load_for_training: the plan's, or the seed tutorial's "unsloth").
        # TRL defaults this to True, and the Trainer would then turn on its own recomputation over that choice: every
        # fast run planned without checkpointing ran with it (bench/RESULTS.md run 39's profile).
        gradient_checkpointing=False,
        packing=plan.packing,
        padding_free=plan.packing,
        pad_to_multiple_of=plan.pad_to_multiple_of,
        train_sampling_strategy=plan.sampling,
        dataloader_num_workers=2 if cuda else 0,  # collation off the training thread
        dataloader_pin_memory=cuda,
        completion_only_loss=True,
        # TRL's default chunked loss reads the output projection's weight directly, which skips the rows that
        # QLORA_LORA__TRAINABLE_TOKENS trains (and fails on peft's wrapper of a tied head): the plain loss then.
        **({"loss_type": "nll"} if settings.lora.trainable_tokens else {}),
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",  # saves are driven by the checkpoint callback (schedule, SIGTERM)
        save_total_limit=settings.checkpoint.keep,
        report_to=check_report_to(settings.metrics.report_to),
        per_device_eval_batch_size=plan.per_device_batch_size,
        # Always once before and once after training (train); in between only when asked. The Trainer then tracks
        # the lowest eval loss in its state (checkpointed), which early stopping reads; best_adapter_callback keeps its weights.
        eval_strategy=settings.eval.strategy,
        eval_steps=settings.eval.steps,
        metric_for_best_model="eval_loss" if settings.eval.strategy != "no" else None,
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # early stopping's counter: off, a resumed run would start it at 0
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; the search costs a pass
        ddp_broadcast_buffers=False,  # the only buffers are rotary tables, equal on every rank
        disable_tqdm=not sys.stdout.isatty(),
        dataset_num_proc=None,
    )


def prepare(settings: Settings, engine_name: str, source: str, rows: Rows, work: Path, run_uri: str, run_id: str,
            init_adapter: Path | None = None) -> TrainSpec:
    """The one value every training process gets: the shaped rows, the model, where the adapter goes, and a
    checkpoint to resume if an earlier pod of this run left one."""
    out = work / "publish"
    if "tensorboard" in settings.metrics.report_to:  # event files go up with the run unless the user points them elsewhere
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    return TrainSpec(
        settings=settings, engine=engine_name, model_source=source, train_dataset=rows.train_dataset,
        eval_dataset=rows.eval_dataset, mean_row_tokens=rows.mean_row_tokens, longest_row_tokens=rows.longest_row_tokens,
        adapter_dir=out / "adapter", checkpoint_dir=work / "checkpoints", run_id=run_id, run_uri=run_uri,
        resume_from=checkpoint.fetch_latest_checkpoint(run_uri, work), metrics_path=work / "worker-metrics.json",
        errors_dir=work / "worker-errors", init_adapter=init_adapter,
    )


def run_training(spec: TrainSpec, push) -> TrainMetrics | None:
    """Train on this node: in this process when it is the only training process, else through torchrun's
    launcher. Returns the metrics, or None on a node other than the first (node 0 verifies and publishes)."""
    nproc, (nodes, node_rank, *_) = distributed.processes_per_node(spec.settings), distributed.node_layout()
    if nproc * nodes == 1:
        from job.engine import free_memory

        metrics = train(spec, on_progress=push.update)
        free_memory()  # the trained model goes before verify loads a fresh one
    else:
        distributed.launch_workers(spec, nproc)
        if node_rank != 0:
            log.info("training finished on this node; node 0 verifies and publishes", node_rank=node_rank)
            return None
        metrics = TrainMetrics(**json.loads(spec.metrics_path.read_text(encoding="utf-8")))
    log.info("training finished", steps=metrics.steps, loss_first=metrics.loss_first, loss_last=metrics.loss_last,
             eval_loss_before=metrics.eval_loss_before, eval_loss_after=metrics.eval_loss_after,
             steady_tokens_per_s=metrics.steady_tokens_per_second, peak_gpu_memory_gib=metrics.peak_gpu_memory_gib,
             train_seconds=metrics.train_seconds, estimated_train_seconds=metrics.estimated_train_seconds,
             first_step_at_s=metrics.first_step_at_s)
    push.update(force=True, eval_loss_before=metrics.eval_loss_before, eval_loss_after=metrics.eval_loss_after)
    return metrics


def log_training_plan(plan: planning.BatchPlan, length: planning.Duration, rows: int, mean_row_tokens: float,
                      fit: planning.MemoryFit | None) -> None:
    """The start line: how much data, how long, in what shape, and an ETA (on a GPU, from the memory and time model
    fitted to this card; the progress lines then give the measured one)."""
    if distributed.ranks().rank != 0:
        return
    eta = round(length.steps * fit.step_seconds) if fit else None
    log.info("training plan", rows=rows, tokens=round(rows * mean_row_tokens), epochs=length.planned_epochs, steps=length.steps,
             steps_per_epoch=length.steps_per_epoch, rows_per_step=plan.rows_per_step, learning_rate=plan.learning_rate,
             eta_s=eta, eta_basis="job/plan.py's time model for this card" if eta is not None else "measured from the first steps")


def full_micro_batches(trainer, rows: int) -> None:
    """Fill each epoch's short last training micro-batch up to `rows` with copies of its first row that train nothing
    (labels all -100), so CUDA graphs replay a recorded shape instead of recording or compiling one more. Each row
    adds nothing to the loss's sum or its token count (the Trainer divides by the labelled tokens of the step), so
    the update is the same; evaluation batches are left as they are (their loss is averaged per row)."""
    import copy

    default = trainer.get_train_dataloader

    def collate(collator):
        def padded(features):
            if 0 < len(features) < rows and "labels" in features[0]:
                blank = copy.deepcopy(features[0])
                blank["labels"] = [-100] * len(blank["labels"])
                for key in ("completion_mask", "assistant_masks"):
                    if key in blank:
                        blank[key] = [0] * len(blank[key])
                features = [*features, *([blank] * (rows - len(features)))]
            return collator(features)
        return padded

    def get_train_dataloader():
        collator = trainer.data_collator
        trainer.data_collator = collate(collator)
        try:
            return default()
        finally:
            trainer.data_collator = collator

    trainer.get_train_dataloader = get_train_dataloader


def order_rows_by_epoch(trainer, seed: int) -> None:
    """Give the trainer a length-grouped sampler whose order is a function of (seed, epoch) alone.
    transformers' own draws from the global RNG, which a resumed run restores only after drawing the
    epoch's order: resumed mid-epoch, it repeated an earlier epoch's order, training some rows twice and
    skipping others. The Trainer calls set_epoch at the start of every epoch, resumed ones included."""
    if trainer.args.train_sampling_strategy != "group_by_length":
        return  # "random": accelerate's seedable sampler is already seeded by epoch
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochOrderedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    default = trainer._get_train_sampler

    def sampler(train_dataset=None):
        grouped = default(train_dataset)
        if not isinstance(grouped, LengthGroupedSampler):
            return grouped
        return EpochOrderedSampler(grouped.batch_size, lengths=grouped.lengths)

    trainer._get_train_sampler = sampler


def check_labels(trainer, end_of_turn_id: int, allow_cut_turns: bool = False) -> dict:
    """First-batch self-check: prompt tokens masked, answer tokens trained, every trained turn ending with the
    template's end-of-turn token."""
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    trained = labels[labels != IGNORE]
    result = {"masked": int((labels == IGNORE).sum()), "trained": int(trained.numel()), "end_of_turn_trained": int((trained == end_of_turn_id).sum())}
    if result["masked"] == 0:
        raise DataError("label check failed: no prompt token is masked, the model would learn to echo prompts")
    if result["trained"] == 0:
        raise DataError("label check failed: no answer token is trained (is every answer truncated away?)")
    if result["end_of_turn_trained"] == 0:
        raise DataError("label check failed: the end-of-turn token is never trained, generation would not stop")
    # Each trained stretch is one assistant turn (every turn of a multi-turn row, or the final one) and must
    # end its turn: a stretch without the end-of-turn token is a mask that spilled or a turn cut short.
    turns = ends = 0
    for row in labels.tolist():
        for is_trained, stretch in itertools.groupby(row, key=lambda token: token != IGNORE):
            if is_trained:
                turns += 1
                ends += end_of_turn_id in list(stretch)
    result["turns_trained"] = turns
    if ends < turns and not allow_cut_turns:
        raise DataError(f"label check failed: {turns - ends} of {turns} trained turns in the first batch do not end with "
                        "the end-of-turn token")
    return result


def progress_callback(on_progress=None):
    """A TrainerCallback that logs step, loss, lr, tokens/s and ETA (and hands them to on_progress, e.g. the
    Pushgateway), records each step's end and the loss curve, and stops training on a non-finite loss."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.start = time.perf_counter()
            self.curve: list[dict] = []
            self.steps: list[tuple[float, int]] = []  # (time, tokens seen) at each step's end
            self.non_finite: tuple | None = None
            self.eval_curve: list[dict] = []
            self.first_step_at: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.perf_counter(), int(state.num_input_tokens_seen)))
            if self.first_step_at is None:  # the cold start: imports, model load, set-up, the first step's compile
                import job

                self.first_step_at = round(time.time() - job.STARTED, 3)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "eval_loss" in logs:  # before, during and after training; the same on every rank
                self.eval_curve.append({"step": state.global_step, "tokens": int(state.num_input_tokens_seen),
                                        "eval_loss": float(logs["eval_loss"])})
                if on_progress is not None and state.is_world_process_zero:
                    on_progress(eval_loss=float(logs["eval_loss"]))
            if "loss" not in logs:
                return  # the loss is already averaged over DDP workers: every rank sees the same value
            elapsed = time.perf_counter() - self.start
            loss = float(logs["loss"])
            self.curve.append({"step": state.global_step, "tokens": int(state.num_input_tokens_seen), "loss": loss,
                               "lr": logs.get("learning_rate")})
            grad_norm = logs.get("grad_norm")
            if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                self.non_finite = (state.global_step, loss, grad_norm)
                control.should_training_stop = True
            if not state.is_world_process_zero:
                return
            tokens_per_s = state.num_input_tokens_seen / elapsed if elapsed else None
            eta_s = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            log.info(
                "progress", step=state.global_step, max_steps=state.max_steps, loss=round(loss, 4),
                lr=logs.get("learning_rate"), grad_norm=grad_norm,
                tokens_per_s=round(tokens_per_s) if tokens_per_s else None, eta_s=round(eta_s, 1),
            )
            if on_progress is not None:
                on_progress(step=state.global_step, max_steps=state.max_steps, loss=loss,
                            tokens_per_second=tokens_per_s, eta_seconds=eta_s)

    return Progress()


def check_eval(metrics: TrainMetrics, require_improvement: bool) -> None:
    """The optional eval gate: held-out loss after training must be below the loss before it."""
    before, after = metrics.eval_loss_before, metrics.eval_loss_after
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


def _step_seconds(start: float, steps: list[tuple[float, int]]) -> list[float]:
    """Wall time of each optimizer step (the first includes compilation): where stalls show."""
    ends = [start] + [t for t, _ in steps]
    return [round(b - a, 3) for a, b in itertools.pairwise(ends)]


def fit_to_this_card(settings: Settings, source: str, plan: planning.BatchPlan,
                     longest_row_tokens: int) -> tuple[planning.BatchPlan, planning.MemoryFit]:
    """plan.fit_to_card for the GPU this process sees, its free memory now and the model's config (no weights):
    checkpointing, CUDA graphs and the rows a micro-batch, sized for the longest rows the data holds."""
    import torch
    from transformers import AutoConfig

    from job import engine

    config = AutoConfig.from_pretrained(source, **engine.hub_kwargs(settings))
    name, _, flops = planning.card(torch.cuda.get_device_name(0))
    free_gib = torch.cuda.mem_get_info()[0] / planning.GiB
    fitted, fit = planning.fit_to_settings(plan, planning.ModelShape.from_config(config), longest_row_tokens, free_gib, flops, name,
                                           settings.model, settings.lora, settings.train)
    log.info("plan fitted to this card", free_gib=round(free_gib, 2), longest_row_tokens=longest_row_tokens,
             per_device_batch_size=fitted.per_device_batch_size, gradient_accumulation_steps=fitted.gradient_accumulation_steps,
             **fit.as_dict())
    return fitted, fit


@dataclass
class Session:
    """What setup builds for one training process, and fit and finish use."""

    spec: TrainSpec
    trainer: object  # trl.SFTTrainer
    model: object
    tokenizer: object
    plan: planning.BatchPlan
    fit: planning.MemoryFit | None  # what the run chose for this card (one process, fast recipe, CUDA)
    length: planning.Duration
    labels: dict  # the first batch's label check
    progress: object  # progress_callback's
    stop: checkpoint.StopRequest
    best: object | None  # best_adapter_callback's, with evaluations during training
    best_folder: Path
    cache_bytes: bytes | None  # the compile cache restored, saved again at the end if it changed
    model_load_s: float
    rows: int  # training rows as loaded (TRL may drop fully masked ones)
    eval_rows: int
    eval_before: float | None = None


def train(spec: TrainSpec, on_progress=None, extra_callbacks: tuple = ()) -> TrainMetrics:
    """Load the base model with fresh LoRA adapters, fine-tune them on the spec's dataset, and on global
    rank 0 save the adapter. Checkpoints go to <run_uri>/checkpoints/ on schedule and on SIGTERM (then exit
    143); spec.resume_from continues one (optimizer, scheduler, RNG, step). Every DDP worker calls this."""
    session = setup(spec, on_progress, extra_callbacks)
    seconds = fit(session)
    return finish(session, seconds)


def setup(spec: TrainSpec, on_progress=None, extra_callbacks: tuple = ()) -> Session:
    """The batch plan for this card, the model (with a warm start's weights), the callbacks and the trainer,
    the run's length from the real data loader, and the first batch's label check."""
    import torch
    from datasets import load_from_disk
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from job import engine

    settings, ranks, cuda = spec.settings, distributed.ranks(), torch.cuda.is_available()
    dataset = load_from_disk(str(spec.train_dataset))
    eval_dataset = load_from_disk(str(spec.eval_dataset)) if spec.eval_dataset else None
    plan = planning.batch_plan(settings.train, settings.model.max_seq_length, spec.mean_row_tokens, ranks.world_size,
                               len(dataset), cuda)
    fitted = None
    if cuda and ranks.world_size == 1 and settings.train.recipe == "fast":
        plan, fitted = fit_to_this_card(settings, spec.model_source, plan, spec.longest_row_tokens)
    log.info("batch plan", recipe=settings.train.recipe, mean_row_tokens=spec.mean_row_tokens, **plan.as_dict())
    if plan.cuda_graphs and spec.engine == "unsloth":  # before the model load: Unsloth reads it when imported
        engine.enable_block_cuda_graphs(planning.CUDA_GRAPH_SHAPES)
    cache_bytes = compile_cache.restore(settings.output_uri) if settings.train.compile_cache and cuda else None
    started = time.perf_counter()
    model, tokenizer = engine.load_for_training(settings, spec.engine, spec.model_source, device=ranks.local_rank,
                                                checkpointing=fitted.gradient_checkpointing if fitted else None)
    if spec.init_adapter is not None and spec.resume_from is None:  # a checkpoint holds the weights trained since
        from job import warmstart

        warmstart.load_into(model, spec.init_adapter)
    model_load_s = round(time.perf_counter() - started, 3)
    log.info("model loaded", engine=spec.engine, source=spec.model_source, seconds=model_load_s)
    stop, progress = checkpoint.StopRequest(), progress_callback(on_progress)
    best_folder = spec.checkpoint_dir.parent / "best-adapter"  # the lowest eval loss's adapter, beside the checkpoints
    best = checkpoint.best_adapter_callback(best_folder, spec.resume_from) if settings.eval.strategy != "no" else None
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, eval_dataset=eval_dataset,
                         args=sft_config(settings, spec.checkpoint_dir, cuda, plan),
                         callbacks=callbacks(spec, progress, stop, best, best_folder, extra_callbacks))
    trainer.remove_callback(PrinterCallback)  # Progress logs through structlog; the printer would repeat it as dicts
    order_rows_by_epoch(trainer, settings.train.seed)
    if plan.cuda_graphs:  # a shape of fewer rows would be recorded (or compiled) once more
        full_micro_batches(trainer, plan.per_device_batch_size)
    # The run's length from the real data loader (after TRL's packing, on this worker's share of the rows).
    length = planning.duration(settings.train, len(trainer.get_train_dataloader()), plan.gradient_accumulation_steps)
    trainer.args.max_steps = length.steps
    log_training_plan(plan, length, len(dataset), spec.mean_row_tokens, fitted)
    labels = check_labels(trainer, chat.end_of_turn_id(tokenizer), allow_cut_turns=settings.data.overlength == "truncate")
    log.info("label check passed", **labels)
    return Session(spec=spec, trainer=trainer, model=model, tokenizer=tokenizer, plan=plan, fit=fitted, length=length,
                   labels=labels, progress=progress, stop=stop, best=best, best_folder=best_folder, cache_bytes=cache_bytes,
                   model_load_s=model_load_s, rows=len(dataset), eval_rows=len(eval_dataset) if eval_dataset is not None else 0)


def callbacks(spec: TrainSpec, progress, stop: checkpoint.StopRequest, best, best_folder: Path, extra: tuple) -> list:
    """Progress, the best adapter, checkpoints on schedule and on SIGTERM, early stopping, then the caller's."""
    cp, evaluation = spec.settings.checkpoint, spec.settings.eval
    found = [progress, *([best] if best else []),
             checkpoint.checkpoint_callback(stop, spec.run_uri, cp.every_steps, cp.every_minutes, cp.keep,
                                            best_folder if best else None),
             *extra]
    if evaluation.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        found.append(EarlyStoppingCallback(evaluation.early_stopping_patience, evaluation.early_stopping_threshold))
    return found


def fit(session: Session) -> float:
    """Evaluate once before, then train (resuming the spec's checkpoint): the seconds it took. A stop request,
    a non-finite loss or running out of GPU memory ends it with that exit code."""
    import torch

    trainer, plan, fitted, spec = session.trainer, session.plan, session.fit, session.spec
    session.eval_before = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    session.stop.install()
    try:
        trainer.train(resume_from_checkpoint=str(spec.resume_from) if spec.resume_from else None)
    except torch.OutOfMemoryError:
        planned = (f" ({plan.per_device_batch_size} rows x {fitted.micro_batch_tokens // plan.per_device_batch_size} tokens, "
                   f"estimated peak {fitted.peak_gpu_memory_gib} GiB of {fitted.budget_gib} planned)") if fitted else ""
        raise OutOfMemory(f"out of GPU memory at step {trainer.state.global_step}{planned}: "
                          f"{planning.out_of_memory_advice(plan, fitted, spec.settings.model.max_seq_length)}") from None
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    seconds = time.perf_counter() - started
    if session.stop.signal is not None:
        raise Terminated(f"stopped by {signal.Signals(session.stop.signal).name} at step {trainer.state.global_step}; "
                         "checkpoint uploaded, a retry of this run resumes from it")
    if session.progress.non_finite:
        step, loss, grad_norm = session.progress.non_finite
        raise NonFiniteLoss(
            f"non-finite loss {loss} (grad norm {grad_norm}) at step {step}: lower QLORA_TRAIN__LEARNING_RATE or check the data"
        )
    return seconds


def keep_best(session: Session) -> float | None:
    """Eval loss after training; with evaluations during training the lowest one's adapter replaces the last."""
    from job import engine

    trainer, best, progress = session.trainer, session.best, session.progress
    steps = trainer.state.global_step
    if best is not None and progress.eval_curve and progress.eval_curve[-1]["step"] == steps:  # evaluated at the last step already
        eval_after = progress.eval_curve[-1]["eval_loss"]
    else:
        eval_after = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    if best is not None and best.best is not None and best.best["eval_loss"] < eval_after:
        if trainer.is_world_process_zero():  # the one process that saves: it publishes the best adapter, not the last
            engine.load_adapter_weights(session.model, session.best_folder)
            log.info("keeping the best adapter, not the last", best_step=best.best["step"], best_eval_loss=best.best["eval_loss"],
                     last_step=steps, last_eval_loss=eval_after, folder=str(session.best_folder))
        eval_after = best.best["eval_loss"]
    elif best is not None:
        best.best = {"step": steps, "eval_loss": eval_after}
    if steps < session.length.steps:
        log.info("stopped early: no lower eval loss", step=steps, planned_steps=session.length.steps,
                 patience=session.spec.settings.eval.early_stopping_patience)
    return eval_after


def finish(session: Session, seconds: float) -> TrainMetrics:
    """Keep the best adapter, save it (global rank 0) with its tokenizer and generation config, and report."""
    import torch

    spec, trainer, plan, fitted, progress = session.spec, session.trainer, session.plan, session.fit, session.progress
    eval_after = keep_best(session)
    if trainer.is_world_process_zero():
        if session.cache_bytes is not None:
            compile_cache.save(spec.settings.output_uri, session.cache_bytes)
        spec.adapter_dir.mkdir(parents=True, exist_ok=True)
        session.model.save_pretrained(str(spec.adapter_dir), safe_serialization=True)
        session.tokenizer.save_pretrained(str(spec.adapter_dir))
        chat.generation_config(session.model, session.tokenizer).save_pretrained(str(spec.adapter_dir))
    steps, curve, tokens = trainer.state.global_step, progress.curve, int(trainer.state.num_input_tokens_seen)
    steady, cuda = steady_tokens_per_second(progress.steps), torch.cuda.is_available()
    return TrainMetrics(
        engine=spec.engine, steps=steps, resumed_from=spec.resume_from.name if spec.resume_from else None,
        rows=session.rows, mean_row_tokens=spec.mean_row_tokens, loss_first=curve[0]["loss"] if curve else None,
        loss_last=curve[-1]["loss"] if curve else None, loss_curve=curve,
        eval_rows=session.eval_rows,
        eval_loss_before=session.eval_before, eval_loss_after=eval_after,
        train_tokens=tokens, train_seconds=round(seconds, 3), tokens_per_second=round(tokens / seconds, 1) if seconds else None,
        steady_tokens_per_second=round(steady, 1) if steady else None, tokens_per_step=round(tokens / max(steps, 1)),
        step_seconds=_step_seconds(progress.start, progress.steps), batch_plan=plan.as_dict(),
        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        world_size=distributed.ranks().world_size, cpu_threads=torch.get_num_threads(), label_check=session.labels,
        model_load_s=session.model_load_s, duration=session.length.as_dict(),
        epochs_trained=round(trainer.state.epoch, 4) if trainer.state.epoch is not None else None,
        eval_curve=progress.eval_curve, best=session.best.best if session.best else None,
        stopped_early=steps < session.length.steps, first_step_at_s=progress.first_step_at,
        memory_fit=fitted.as_dict() if fitted else None,
        estimated_train_seconds=fitted.train_seconds(steps * plan.gradient_accumulation_steps, tokens) if fitted else None,
    )
