"""Multi-process training through torchrun's launcher (DDP), on CPU with the gloo backend:
the same code path a multi-GPU pod takes, with two workers on this machine's two cores."""

import json
import os

import pytest

from job.errors import ExitCode
from tests.conftest import run_job
from tests.test_e2e import FACTS, _events, s3_run  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_two_workers_train_one_adapter_that_reproduces_what_it_learned(s3, bucket, s3_run):  # noqa: F811
    env = {**s3_run, "QLORA_NPROC_PER_NODE": "2", "QLORA_RUN_ID": "ddp-1"}
    result = run_job(env=env)
    assert result.returncode == ExitCode.OK, result.stderr[-3000:] + result.stdout[-3000:]
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/ddp-1/metrics.json")["Body"].read())
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/ddp-1/verify.json")["Body"].read())
    assert metrics["world_size"] == 2 and metrics["batch_plan"]["world_size"] == 2
    # Two workers share this machine's two cores: one torch thread each, as torchrun's command line sets.
    assert metrics["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert metrics["loss_last"] < 0.2 * metrics["loss_first"]
    assert verify["passed"] and all(p["matches_expected"] for p in verify["probes"])
    # Rank 0 alone logs progress: one progress line per step, not two.
    progress = [e for e in _events(result.stdout) if e.get("event") == "progress"]
    assert [e["step"] for e in progress] == list(range(1, metrics["steps"] + 1))


def test_a_failing_worker_fails_the_run_with_its_own_exit_code_and_cause(s3, bucket, s3_run):  # noqa: F811
    # A learning rate this high overflows to NaN in a few steps: every worker exits 12 (non-finite loss).
    env = {**s3_run, "QLORA_NPROC_PER_NODE": "2", "QLORA_RUN_ID": "ddp-nan", "QLORA_TRAIN__LEARNING_RATE": "1e30"}
    result = run_job(env=env)
    assert result.returncode == ExitCode.NON_FINITE_LOSS, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qlora-job: error: worker ") and "non-finite loss" in last
    assert "Traceback" not in result.stderr.split("qlora-job: error")[-1]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="runs/ddp-nan/")
