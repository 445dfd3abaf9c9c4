"""Exit codes: the one table that the entry point, the docs and the Helm chart's
podFailurePolicy all read. Each error type carries its code; only `job.__main__`
turns an exception into a process exit."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    CONFIG = 2
    DATA = 3
    VERIFY = 4
    MODEL_LOAD = 5
    EXPORT = 6
    NOT_PROMOTED = 7
    NOT_SERVABLE = 8
    STORAGE = 10
    OUT_OF_MEMORY = 11
    NON_FINITE_LOSS = 12
    TERMINATED = 143


# code -> (retry?, meaning). `retry` drives the chart's podFailurePolicy:
# False means FailJob (retrying the same pod cannot help).
EXIT_CODES: dict[ExitCode, tuple[bool, str]] = {
    ExitCode.OK: (False, "success, or this run_id already has a manifest (idempotent retry)"),
    ExitCode.INTERNAL: (True, "unexpected internal error"),
    ExitCode.CONFIG: (False, "configuration error (bad or missing setting, bucket or permission)"),
    ExitCode.DATA: (False, "data error (unreadable dataset, too many bad rows, bad labels)"),
    ExitCode.VERIFY: (False, "verification failed (the reloaded adapter misbehaves)"),
    ExitCode.MODEL_LOAD: (False, "model load error (missing or incompatible weights)"),
    ExitCode.EXPORT: (False, "export failed (merged model or a required GGUF conversion)"),
    ExitCode.NOT_PROMOTED: (False, "published but not promoted: worse than the champion on held-out answers "
                            "(only with QLORA_PROMOTION__FAIL_WHEN_NOT_PROMOTED=true)"),
    ExitCode.NOT_SERVABLE: (False, "the adapter would not load in an engine QLORA_VERIFY__REQUIRE_SERVABLE names "
                            "(vLLM, SGLang, llama.cpp); nothing published"),
    ExitCode.STORAGE: (True, "storage error after retries (S3 unreachable, 5xx)"),
    ExitCode.OUT_OF_MEMORY: (False, "out of GPU memory (retry only with other settings)"),
    ExitCode.NON_FINITE_LOSS: (False, "non-finite loss"),
    ExitCode.TERMINATED: (True, "terminated (SIGTERM) after a checkpoint was saved; a retry resumes"),
}


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message, at most `limit` characters; its type's name when it has none."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return text.splitlines()[0][:limit]


class JobError(Exception):
    """An expected failure: its message is one line for the user, its code the exit status."""

    exit_code = ExitCode.INTERNAL


class ConfigError(JobError):
    exit_code = ExitCode.CONFIG


class DataError(JobError):
    exit_code = ExitCode.DATA


class VerifyError(JobError):
    exit_code = ExitCode.VERIFY


class ModelLoadError(JobError):
    exit_code = ExitCode.MODEL_LOAD


class ExportError(JobError):
    exit_code = ExitCode.EXPORT


class NotPromoted(JobError):
    exit_code = ExitCode.NOT_PROMOTED


class NotServable(JobError):
    exit_code = ExitCode.NOT_SERVABLE


class StorageError(JobError):
    """S3 or file I/O failed. Permanent client errors (403, missing bucket) are
    configuration errors and must not be retried, so they carry code 2."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.exit_code = ExitCode.CONFIG if permanent else ExitCode.STORAGE


class OutOfMemory(JobError):
    exit_code = ExitCode.OUT_OF_MEMORY


class NonFiniteLoss(JobError):
    exit_code = ExitCode.NON_FINITE_LOSS


class Terminated(JobError):
    exit_code = ExitCode.TERMINATED


class WorkerFailed(JobError):
    """A training worker (multi-GPU) failed; carries that worker's own exit code."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.exit_code = code
