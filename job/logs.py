"""structlog set-up: JSON lines in pods, a readable console on a TTY, and stdlib
logging (transformers, datasets, boto3) rendered by the same processors."""

import contextlib
import logging
import os
import sys
import time

import structlog

# Libraries that are chatty at INFO and say nothing a run's log needs.
QUIET = ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "fsspec", "httpx", "werkzeug")


def configure_logging(log_format: str = "auto", level: str = "info", stream=None) -> None:
    """Route structlog and stdlib logging to stdout (or stream: `plan` keeps stdout for its report) through one renderer."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    if not sys.stdout.isatty():
        # tqdm bars (model loading, datasets, hub) are noise in pod logs; tqdm honours this variable.
        os.environ.setdefault("TQDM_DISABLE", "1")
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # transformers and datasets install their own handlers; send them to the root instead.
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "unsloth"):
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def bind(**values) -> None:
    """Attach values (run_id, stage) to every later event of this run."""
    structlog.contextvars.bind_contextvars(**values)


def get_logger(name: str = "job"):
    return structlog.stdlib.get_logger(name)


class Stages:
    """`with stages("fetch"):` binds the log's stage, times it into `timings` as fetch_s (also when it
    fails), and logs "stage finished" with its seconds."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        bind(stage=name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = round(time.perf_counter() - started, 3)
        get_logger("job").info("stage finished", seconds=self.timings[f"{name}_s"])
