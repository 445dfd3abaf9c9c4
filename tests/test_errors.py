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
