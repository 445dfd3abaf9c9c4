"""`qlora-job plan`: what a run would do, found out on a CPU before a GPU is requested.

It fetches and validates the data as the run does, tokenizes it with the base model's tokenizer
(its tokenizer and config files only, never the weights), sizes the run as train.train would,
checks that the output prefix takes a write and that the base model is readable, and prints one
JSON report. It exits with the job's codes: 3 for bad data, 2 for access or settings, 5 for a base
model that cannot be read. Time and memory are estimates from the bench's H200 constants (plan.py)."""

import math
import secrets
import tempfile
from pathlib import Path

from job import data, engine, storage
from job import plan as planning
from job.errors import ModelLoadError
from job.logs import get_logger
from job.settings import Settings

log = get_logger(__name__)

# What a tokenizer and config need from a model folder: everything but the weights.
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")


def run(settings: Settings) -> dict:
    """The plan report; raises the job's errors (after logging what is known) when the run would fail."""
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plan-", dir=settings.work_dir) as folder:
        work = Path(folder)
        writable = check_output_writable(settings.output_uri)
        tokenizer, config = _tokenizer_without_weights(settings, work / "model")
        inputs = data.fetch_inputs(settings, work / "input")
        report, eval_report = data.validate_inputs(settings, inputs, work)
        sizing = _sizing(settings, report, eval_report, tokenizer, planning.ModelShape.from_config(config))
    return {"data": _data_summary(report), "eval_data": _data_summary(eval_report) if eval_report else None, **sizing,
            "output_writable": writable, "base_model": {"name": settings.model.name, "readable": True}}


def check_output_writable(output_uri: str) -> bool:
    """Write a probe object under the output prefix and delete it: a run's uploads would be allowed."""
    probe = storage.join(output_uri, f".qlora-job-plan-probe-{secrets.token_hex(4)}")
    storage.put_bytes(b"qlora-job plan: write probe, deleted right after\n", probe)
    storage.delete_keys(output_uri, [probe.rsplit("/", 1)[-1]])
    return True


def _tokenizer_without_weights(settings: Settings, folder: Path):
    """The base model's tokenizer and config, reading no weight file: an S3 prefix's small files are
    downloaded, a local folder or hub id is read in place."""
    from transformers import AutoConfig

    name = settings.model.name
    source = name
    if storage.is_s3(name):
        listed = storage.list_keys(name)
        keys = [key for key in listed if not key.lower().endswith(WEIGHTS_SUFFIXES)]
        if "config.json" not in keys or len(keys) == len(listed):
            raise ModelLoadError(f"cannot load base model {name!r}: no config.json and weight files under this prefix")
        for key, target in zip(keys, storage.checked_targets(name, folder, keys, ModelLoadError), strict=True):
            storage.fetch_file(storage.join(name, key), target)
        log.info("base model files fetched, weights left out", files=keys)
        source = str(folder)
    elif name.startswith("file://"):
        source = storage.local_path(name).as_posix()
    tokenizer = engine.load_tokenizer(settings, source)
    with engine.load_errors(f"cannot load base model {name!r}"):
        config = AutoConfig.from_pretrained(source, **engine.hub_kwargs(settings))
    return tokenizer, config


def _data_summary(report: data.DataReport) -> dict:
    return {k: v for k, v in report.summary().items() if k != "shards"} | {"shards": len(report.shards)}


def _sizing(settings: Settings, report: data.DataReport, eval_report, tokenizer, shape: planning.ModelShape) -> dict:
    """Tokens, over-length rows, epochs, steps, the batch shape fitted to the planned card (QLORA_PLAN__GPU) and the
    time and memory estimates, as the rows stage and train.train would find them."""
    from job import rows

    examples, _, mean_tokens, longest = rows.training_rows(settings, report, eval_report, tokenizer)
    if "format" not in examples.column_names or "messages" not in set(examples["format"]):
        epoch_tokens = round(mean_tokens * len(examples))
    else:  # a turn's row may repeat its history: measure what will be trained
        measured, _ = rows.drop_overlength(examples, tokenizer, 1 << 30, "truncate")
        epoch_tokens = sum(measured["n_tokens"])
    world = 1 if settings.nproc_per_node == "auto" else int(settings.nproc_per_node)
    batch = planning.batch_plan(settings.train, settings.model.max_seq_length, mean_tokens, world, len(examples), cuda=True)
    gpu, card_gib, flops = planning.card(settings.plan.gpu)
    free_gib = card_gib - planning.CUDA_CONTEXT_GIB
    choice, train = settings.lora.gradient_checkpointing, settings.train
    if train.recipe == "fast" and world == 1:
        batch, fit = planning.fit_to_settings(batch, shape, longest, free_gib, flops, gpu, settings.model, settings.lora, train)
        checkpointing, micro_batch_tokens, peak = fit.gradient_checkpointing, fit.micro_batch_tokens, fit.peak_gpu_memory_gib
    else:  # the seed recipe as written (offloaded checkpointing), or several processes: planned as set
        checkpointing = choice != "false" if choice != "auto" else train.recipe == "seed"
        micro_batch_tokens = batch.per_device_batch_size * planning.row_tokens(batch, longest, settings.model.max_seq_length)
        peak = round(planning.estimated_peak_gib(shape, micro_batch_tokens, checkpointing, cuda_graphs=batch.cuda_graphs,
                                                 load_in_4bit=settings.model.load_in_4bit, lora_r=settings.lora.r), 2)
    if batch.packing:  # sequences of max_seq_length tokens: an estimate of what TRL's packing makes
        sequences = math.ceil(epoch_tokens / settings.model.max_seq_length)
        micro_batches = math.ceil(math.ceil(sequences / world) / batch.per_device_batch_size)
    else:
        micro_batches = planning.micro_batches_per_epoch(len(examples), batch)
    length = planning.duration(settings.train, micro_batches, batch.gradient_accumulation_steps)
    return {
        "tokens": {"total": report.tokens, "longest_row": report.longest_row_tokens, "mean_row": mean_tokens,
                   "rows_over_max_seq_length": report.overlength_rows, "max_seq_length": settings.model.max_seq_length,
                   "overlength": settings.data.overlength},
        "training": {"recipe": settings.train.recipe, "examples": len(examples), "tokens_per_epoch": epoch_tokens,
                     **length.as_dict(), "rows_per_step": batch.rows_per_step,
                     "tokens_per_step": round(epoch_tokens / length.steps_per_epoch), "learning_rate": batch.learning_rate,
                     "warmup_steps": batch.warmup_steps, "per_device_batch_size": batch.per_device_batch_size,
                     "gradient_accumulation_steps": batch.gradient_accumulation_steps, "world_size": world,
                     "micro_batch_tokens": micro_batch_tokens, "gradient_checkpointing": checkpointing, "cuda_graphs": batch.cuda_graphs},
        "estimate": {"basis": f"the memory and time model of job/plan.py (fitted on 0.6B-8B shapes, bench/RESULTS.md) for one "
                              f"{gpu} ({card_gib} GiB, {flops / 1e12:g} dense bf16 TFLOP/s): an estimate, not a measurement",
                     "gpu": gpu, "free_gib": round(free_gib, 1), "model_params": shape.params,
                     "train_seconds": planning.estimated_train_seconds(
                         shape, length.steps, batch.gradient_accumulation_steps, epoch_tokens * length.planned_epochs, checkpointing, flops,
                         batch.cuda_graphs, planning.one_off_seconds(batch.cuda_graphs, planning.row_tokens(
                             batch, longest, settings.model.max_seq_length), batch.pad_to_multiple_of)),
                     "peak_gpu_memory_gib": peak},
    }
