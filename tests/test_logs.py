"""Logging set-up and the stage context (job/logs.py)."""

import pytest
import structlog
from structlog.testing import capture_logs

from job.logs import Stages


def test_a_stage_binds_its_name_times_itself_and_logs_its_end():
    timings = {}
    with capture_logs() as events, Stages(timings)("fetch"):
        assert structlog.contextvars.get_contextvars()["stage"] == "fetch"
    assert set(timings) == {"fetch_s"} and timings["fetch_s"] >= 0
    assert events[-1]["event"] == "stage finished" and events[-1]["seconds"] == timings["fetch_s"]


def test_a_failed_stage_is_timed_but_not_logged_as_finished():
    timings = {}
    with capture_logs() as events, pytest.raises(ValueError), Stages(timings)("verify"):
        raise ValueError("gate")
    assert "verify_s" in timings and not any(e["event"] == "stage finished" for e in events)
