"""Entry point: `python -m job` (or `qlora-job`) runs one fine-tuning run, top to bottom:

  settings -> already published? -> fetch dataset -> validate -> load base model + LoRA
  -> train -> save adapter -> reload in a fresh model + generate (gate) -> publish, manifest last

This is the only place where exceptions become exit codes (job/errors.py)."""

import argparse
import datetime
import json
import os
import secrets
import sys
import time
from pathlib import Path

from job import storage
from job.errors import EXIT_CODES, ExitCode, JobError
from job.logs import bind, configure_logging, get_logger
from job.settings import Settings, env_docs, load_settings, redacted

log = get_logger("job")


def new_run_id() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def run(settings: Settings, run_id: str, push) -> ExitCode:
    """One fine-tuning run; each stage is one call."""
    from job import checkpoint, data, distributed, engine, export, observe, publish, retrain, train, verify

    run_uri = storage.join(settings.output_uri, run_id)
    bind(run_id=run_id, stage="start")
    log.info("run starting", output=run_uri, dataset=settings.dataset_uri, model=settings.model.name)
    if (existing := publish.find_manifest(run_uri)) is not None:
        log.info("run already published; nothing to do", published_at=existing.get("published_at"))
        retrain.move_latest(settings.output_uri, existing)  # a pod that published but failed to move it
        return ExitCode.OK
    gguf_converter = export.check_settings(settings)
    observe.check_report_to(settings.metrics.report_to)

    work = settings.work_dir / run_id
    out = work / "publish"  # exactly what gets uploaded
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    bind(stage="fetch")
    started = time.perf_counter()
    dataset_path = storage.fetch_file(settings.dataset_uri, work / "input" / "dataset.jsonl")
    eval_path = storage.fetch_file(settings.eval.dataset_uri, work / "input" / "eval.jsonl") if settings.eval.dataset_uri else None
    timings["fetch_s"] = time.perf_counter() - started
    log.info("dataset fetched", bytes=dataset_path.stat().st_size, seconds=round(timings["fetch_s"], 2))

    bind(stage="validate")
    report = data.validate_dataset(
        dataset_path, work, max_line_bytes=settings.data.max_line_bytes, system_prompt=settings.data.system_prompt
    )
    log.info("dataset validated", **{k: v for k, v in report.summary().items() if k != "first_rejects"})
    for reject in report.first_rejects[:5]:
        log.warning("rejected row", **reject)
    data.check_report(report, settings.data.max_reject_ratio)
    eval_report = None
    if eval_path is not None:
        eval_report = data.validate_dataset(eval_path, work / "eval", max_line_bytes=settings.data.max_line_bytes,
                                            system_prompt=settings.data.system_prompt)
        data.check_report(eval_report, settings.data.max_reject_ratio)

    # Periodic retraining: nothing to do when data, settings and base model are those of the latest run.
    started = time.perf_counter()
    identity = retrain.identity(report.sha256, settings, engine.base_model_fingerprint(settings))
    log.info("base model fingerprinted", fingerprint=identity["base_model"]["fingerprint"],
             seconds=round(time.perf_counter() - started, 2))
    latest = retrain.read_latest(settings.output_uri)
    if settings.retrain.skip_unchanged and retrain.unchanged_since(latest, identity):
        log.info("unchanged since the latest published run; skipping", latest_run=latest["run_id"],
                 dataset_sha256=report.sha256, settings_sha256=identity["settings_sha256"])
        return ExitCode.OK

    bind(stage="load")
    started = time.perf_counter()
    chosen = engine.resolve_engine(settings.engine)
    base_source = engine.fetch_base_model(settings, identity["base_model"]["fingerprint"])
    nproc = distributed.processes_per_node(settings)
    nodes, node_rank, *_ = distributed.node_layout()
    in_process = nproc * nodes == 1
    if in_process:
        model, tokenizer = engine.load_for_training(settings, chosen, base_source)
    else:  # the workers load the model; this process only needs the tokenizer to prepare the data
        tokenizer = engine.load_tokenizer(settings, base_source)
    timings["load_s"] = time.perf_counter() - started
    log.info("model loaded" if in_process else "tokenizer loaded", engine=chosen, source=base_source,
             seconds=round(timings["load_s"], 2))

    bind(stage="train")
    dataset, stats = train.load_train_dataset(report.train_path, report.rejects_path, tokenizer, settings)
    report.accepted -= stats["rejected"]
    report.rejected += stats["rejected"]
    report.first_rejects.extend(stats["first_rejects"])
    data.check_report(report, settings.data.max_reject_ratio)
    if eval_report is not None:
        eval_dataset, _ = train.load_train_dataset(eval_report.train_path, eval_report.rejects_path, tokenizer, settings)
    else:
        dataset, eval_dataset = train.split_eval(dataset, settings.eval.fraction, settings.train.seed)
    resume = checkpoint.fetch_latest_checkpoint(run_uri, work)
    if "tensorboard" in settings.metrics.report_to:  # event files go up with the run unless the user points them elsewhere
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    if in_process:
        metrics = train.train_adapter(model, tokenizer, dataset, out / "adapter", settings, chosen, stats["mean_row_tokens"],
                                      run_uri=run_uri, resume_from=resume, eval_dataset=eval_dataset,
                                      on_progress=push.update)
        del model
    else:
        dataset.save_to_disk(str(work / "train-dataset"))
        if eval_dataset is not None:
            eval_dataset.save_to_disk(str(work / "eval-dataset"))
        spec = {"engine": chosen, "source": base_source, "dataset": str(work / "train-dataset"), "adapter": str(out / "adapter"),
                "eval_dataset": str(work / "eval-dataset") if eval_dataset is not None else None, "run_id": run_id,
                "metrics": str(work / "worker-metrics.json"), "mean_row_tokens": stats["mean_row_tokens"], "run_uri": run_uri,
                "resume_from": str(resume) if resume else None}
        distributed.launch_workers(spec, work, nproc, run_id)
        if node_rank != 0:
            log.info("training finished on this node; node 0 verifies and publishes", node_rank=node_rank)
            return ExitCode.OK
        metrics = json.loads((work / "worker-metrics.json").read_text(encoding="utf-8"))
    metrics.update(run_id=run_id, engine=chosen, overlength_truncated=stats["truncated"], mean_row_tokens=stats["mean_row_tokens"],
                   timings={k: round(v, 3) for k, v in timings.items()})
    # Written now as well as at publish, so a run that fails a gate still leaves its numbers in the work dir.
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
    log.info("training finished", steps=metrics["steps"], loss_first=metrics["loss_first"], loss_last=metrics["loss_last"],
             eval_loss_before=metrics["eval_loss_before"], eval_loss_after=metrics["eval_loss_after"],
             steady_tokens_per_s=metrics["steady_tokens_per_second"], peak_gpu_memory_gib=metrics["peak_gpu_memory_gib"])
    push.update(force=True, eval_loss_before=metrics["eval_loss_before"], eval_loss_after=metrics["eval_loss_after"])
    del tokenizer, dataset, eval_dataset
    engine.free_memory()
    train.check_eval(metrics, settings.eval.require_improvement)

    bind(stage="verify")
    started = time.perf_counter()
    model, tokenizer = engine.load_for_inference(settings, chosen, base_source, out / "adapter")
    probes = verify.build_probes(settings, report.train_path)
    try:
        adapter_report = verify.verify_adapter(model, tokenizer, probes, work / "verify.json", settings)
    finally:
        timings["verify_s"] = time.perf_counter() - started
    (work / "verify.json").replace(out / "verify.json")
    del model, tokenizer
    engine.free_memory()

    if settings.export.merged:
        bind(stage="export")
        started = time.perf_counter()
        merged = export.merge_adapter(settings, chosen, base_source, out / "adapter", out / "merged")
        engine.free_memory()
        model, tokenizer = export.load_merged(merged)
        verify.verify_merged(model, tokenizer, probes, adapter_report, work / "verify-merged.json", settings)
        (work / "verify-merged.json").replace(out / "verify-merged.json")
        del model, tokenizer
        engine.free_memory()
        if gguf_converter is not None:
            export.convert_gguf(gguf_converter, merged, out / "gguf", settings.export.gguf_type, settings.export.gguf == "require")
        timings["export_s"] = time.perf_counter() - started

    bind(stage="publish")
    report.rejects_path.replace(out / "rejects.jsonl")
    metrics.update(data=report.summary(), timings={k: round(v, 3) for k, v in timings.items()})
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
    if settings.metrics.loss_curve_png:
        observe.write_loss_curve(metrics, out / "loss_curve.png")
    manifest = {
        "run_id": run_id,
        "dataset": {"uri": settings.dataset_uri, "sha256": report.sha256, "rows_accepted": report.accepted,
                    "rows_rejected": report.rejected},
        "base_model": identity["base_model"],
        "engine": chosen,
        "settings": redacted(settings),
        "settings_sha256": identity["settings_sha256"],
        "loss": {"first": metrics["loss_first"], "last": metrics["loss_last"],
                 "eval_before": metrics["eval_loss_before"], "eval_after": metrics["eval_loss_after"]},
    }
    published = publish.publish_run(out, run_uri, manifest)
    if published is None:
        log.warning("another pod published this run_id first; its manifest stands and ours was not written")
        return ExitCode.OK
    log.info("run published", manifest=storage.join(run_uri, publish.MANIFEST))
    retrain.move_latest(settings.output_uri, published)
    retrain.apply_retention(settings.output_uri, settings.retrain.keep_runs, protect={run_id})
    checkpoint.delete_checkpoints(run_uri)
    return ExitCode.OK


def train_worker_command(spec_path: Path) -> ExitCode:
    """One DDP training process, started by distributed.launch_workers: load, train, and on global
    rank 0 save the adapter and the metrics where the launching process reads them."""
    from datasets import load_from_disk

    from job import distributed, engine, observe, train

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    bind(stage="train", rank=distributed.world_rank())
    started = time.perf_counter()
    model, tokenizer = engine.load_for_training(settings, spec["engine"], spec["source"])
    load_s = time.perf_counter() - started
    try:
        metrics = train.train_adapter(
            model, tokenizer, load_from_disk(spec["dataset"]), Path(spec["adapter"]), settings, spec["engine"],
            spec["mean_row_tokens"], run_uri=spec["run_uri"], resume_from=Path(spec["resume_from"]) if spec["resume_from"] else None,
            eval_dataset=load_from_disk(spec["eval_dataset"]) if spec["eval_dataset"] else None,
            on_progress=observe.pusher(settings, spec["run_id"]).update,
        )
    finally:
        distributed.leave_process_group()  # exiting with the group alive can abort the process (SIGABRT)
    if distributed.world_rank() == 0:
        Path(spec["metrics"]).write_text(json.dumps({**metrics, "worker_load_s": round(load_s, 3)}), encoding="utf-8")
    return ExitCode.OK


def validate_data_command(uri: str, max_reject_ratio: float, work_dir: Path) -> ExitCode:
    """Fetch and validate a dataset only; print the report."""
    from job import data

    path = storage.fetch_file(uri, work_dir / "validate" / "dataset.jsonl") if storage.is_s3(uri) else storage.local_path(uri)
    report = data.validate_dataset(path, work_dir / "validate")
    print(json.dumps(report.summary(), ensure_ascii=False, indent=2))
    data.check_report(report, max_reject_ratio)
    return ExitCode.OK


def config_command(env_docs_only: bool, as_markdown: bool) -> ExitCode:
    if not env_docs_only:
        print(json.dumps(redacted(load_settings()), indent=2))
        return ExitCode.OK
    rows = env_docs()
    if as_markdown:
        print("| variable | type | default | description |\n| --- | --- | --- | --- |")
        for row in rows:
            default = f"`{row['default']}`" if row["default"] else ""
            print(f"| `{row['name']}` | {row['type']} | {default} | {row['description']} |")
    else:
        print(json.dumps(rows, indent=2))
    return ExitCode.OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-job", description="QLoRA fine-tuning job; settings come from QLORA_* variables.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run one fine-tuning job (the default)")
    config = commands.add_parser("config", help="print the resolved settings (secrets redacted)")
    config.add_argument("--env-docs", action="store_true", help="list every variable with type, default and description")
    config.add_argument("--markdown", action="store_true", help="with --env-docs: a Markdown table")
    validate = commands.add_parser("validate-data", help="validate a JSONL dataset and print a report")
    validate.add_argument("uri")
    validate.add_argument("--max-reject-ratio", type=float, default=0.0)
    tiny = commands.add_parser("make-tiny-model", help="build a tiny random Qwen3 model + tokenizer for tests")
    tiny.add_argument("dir", type=Path)
    commands.add_parser("exit-codes", help="print the exit-code table as JSON")
    worker = commands.add_parser("train-worker", help=argparse.SUPPRESS)  # started by the job itself for multi-GPU runs
    worker.add_argument("spec", type=Path)
    return parser.parse_args(argv)


def write_termination_log(path: Path, message: str) -> None:
    """One line for `kubectl describe pod`; skipped silently where it cannot be written (laptops)."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(message.replace("\n", " ")[:4000] + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(os.environ.get("QLORA_LOG_FORMAT", "auto"), "info")
    termination_log = Path(os.environ.get("QLORA_TERMINATION_LOG", "/dev/termination-log"))
    if args.command == "train-worker":  # the launching process reads each worker's cause from here
        termination_log = Path(json.loads(args.spec.read_text())["errors"]) / f"rank-{os.environ.get('RANK', '0')}.txt"
    try:
        if args.command == "config":
            return config_command(args.env_docs, args.markdown)
        if args.command == "exit-codes":
            print(json.dumps({int(c): {"name": c.name, "retry": r, "meaning": m} for c, (r, m) in EXIT_CODES.items()}, indent=2))
            return ExitCode.OK
        if args.command == "make-tiny-model":
            from job.tiny import make_tiny_model

            print(make_tiny_model(args.dir))
            return ExitCode.OK
        if args.command == "train-worker":
            return train_worker_command(args.spec)
        if args.command == "validate-data":
            return validate_data_command(args.uri, args.max_reject_ratio, Path(os.environ.get("QLORA_WORK_DIR", "/tmp/qlora-job")))
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        termination_log = settings.termination_log
        from job import observe

        run_id = settings.run_id or new_run_id()
        push, started = observe.pusher(settings, run_id), time.perf_counter()
        try:
            code = run(settings, run_id, push)
        except BaseException as error:  # the final push reports failures too; main's handlers below map them
            push.update(force=True, finished=1, duration_seconds=time.perf_counter() - started,
                        exit_code=int(getattr(error, "exit_code", ExitCode.INTERNAL)))
            raise
        push.update(force=True, finished=1, exit_code=int(code), duration_seconds=time.perf_counter() - started)
        return code
    except JobError as error:
        code, message = error.exit_code, str(error)
    except KeyboardInterrupt:
        code, message = ExitCode.TERMINATED, "interrupted"
    except Exception as error:  # the one broad catch: anything unexpected is exit 1, with its traceback logged
        log.exception("internal error")
        code, message = ExitCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    message = message.splitlines()[0] if message else code.name.lower()
    if args.command in (None, "run"):  # tool commands keep stdout for their own output
        log.error("run failed", exit_code=int(code), error=message)
    print(f"qlora-job: error: {message}", file=sys.stderr)
    write_termination_log(termination_log, message)
    if args.command == "train-worker":  # its own code, in case the launcher's view of the exit is a signal
        write_termination_log(termination_log.with_suffix(".code"), str(int(code)))
    return int(code)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
