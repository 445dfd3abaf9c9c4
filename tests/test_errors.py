"""One-line causes (job/errors.py): every message the job prints or writes to the termination log."""

import pytest

from job.errors import EXIT_CODES, ExitCode, one_line


@pytest.mark.parametrize(("error", "expected"), [
    (OSError("disk full\nTraceback (most recent call last): ..."), "disk full"),
    (ValueError(""), "ValueError"),  # an empty message names its type instead of failing
    (RuntimeError("   \n  "), "RuntimeError"),
    ("", "unknown error"),
    (KeyError("model.embed_tokens"), "'model.embed_tokens'"),
])
def test_one_line_is_the_first_line_of_the_cause(error, expected):
    assert one_line(error) == expected


def test_one_line_is_bounded():
    assert one_line("x" * 1000) == "x" * 300 and one_line("x" * 1000, 10) == "x" * 10


def test_every_exit_code_has_a_retry_decision_and_a_meaning():
    assert set(EXIT_CODES) == set(ExitCode)
    assert all(isinstance(retry, bool) and meaning for retry, meaning in EXIT_CODES.values())


def test_a_closed_pipe_ends_a_tool_command_quietly():
    """`qlora-job config --env-docs | head -1`: the reader leaving is not an internal error."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    job = subprocess.Popen([sys.executable, "-m", "job", "config", "--env-docs", "--markdown"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**env, "QLORA_TERMINATION_LOG": "/dev/null"})
    job.stdout.close()  # before the job has written anything: its first write meets a closed pipe
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    assert b"Traceback" not in stderr and b"internal error" not in stderr
