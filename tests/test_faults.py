"""Fault injection against a real S3 server and real CPU training: preemption and resume,
out-of-memory, non-finite loss, flaky storage."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from job.errors import ExitCode
from tests.conftest import REPO, run_job
from tests.test_e2e import FACTS

STEPS = 150


@pytest.fixture
def job_env(s3, bucket, s3_env, tiny_model, tmp_path):
    body = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS)
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body.encode())
    return {
        **s3_env, "HF_HUB_OFFLINE": "1",
        "QLORA_DATASET_URI": f"s3://{bucket}/data/facts.jsonl", "QLORA_OUTPUT_URI": f"s3://{bucket}/runs",
        "QLORA_MODEL__NAME": str(tiny_model), "QLORA_WORK_DIR": str(tmp_path / "work"),
        "QLORA_TRAIN__MAX_STEPS": str(STEPS), "QLORA_TRAIN__LEARNING_RATE": "1e-2",
        "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "QLORA_CHECKPOINT__KEEP": "2",
        "QLORA_RETRAIN__SKIP_UNCHANGED": "false",  # independent trials on one dataset, each must train
    }


def _interrupt_at(step: int, env: dict) -> tuple[int, str]:
    """Start the job, send SIGTERM once it logs `step`, return (exit code, output)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_"))}
    proc = subprocess.Popen([sys.executable, "-m", "job"], env={**base, "QLORA_LOG_FORMAT": "json", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{") and (event := json.loads(line)).get("event") == "progress" and event["step"] >= step:
            proc.send_signal(signal.SIGTERM)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.parametrize("trials", [1, pytest.param(5, marks=pytest.mark.long)])  # five in make test-long
def test_sigterm_at_random_steps_checkpoints_and_the_retry_resumes_to_the_same_step_count(s3, bucket, job_env, trials):
    rng = random.Random(20261128 + trials)
    for trial in range(trials):
        run_id = f"preempt-{trial}"
        env = {**job_env, "QLORA_RUN_ID": run_id, "QLORA_WORK_DIR": f"{job_env['QLORA_WORK_DIR']}-{trial}"}
        at = rng.randint(5, STEPS - 10)
        code, output = _interrupt_at(at, env)
        assert code == ExitCode.TERMINATED, output[-3000:]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{run_id}/").get("Contents", [])]
        markers = [k for k in keys if k.endswith("/COMPLETE")]
        assert len(markers) == 1 and not any(k.endswith("manifest.json") for k in keys), keys
        saved = int(markers[0].split("checkpoint-")[1].split("/")[0])
        assert at <= saved < at + 5, (at, saved)

        # The pod is retried (a new pod: a fresh work folder) and resumes.
        resumed = run_job(env={**env, "QLORA_WORK_DIR": env["QLORA_WORK_DIR"] + "-retry"})
        assert resumed.returncode == 0, resumed.stderr + resumed.stdout[-3000:]
        metrics = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/{run_id}/metrics.json")["Body"].read())
        verify = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/{run_id}/verify.json")["Body"].read())
        assert metrics["resumed_from"] == f"checkpoint-{saved}" and metrics["steps"] == STEPS and verify["passed"]
        assert metrics["loss_curve"][0]["step"] == saved + 1, "training continued where the checkpoint left off"
        left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{run_id}/checkpoints/").get("Contents", [])]
        assert left == [], "checkpoints are removed once the manifest is written"
        print(f"trial {trial}: SIGTERM at step {at}, checkpoint-{saved}, resumed to {metrics['steps']}")


def test_a_checkpoint_without_its_marker_is_ignored(s3, bucket, job_env):
    s3.put_object(Bucket=bucket, Key="runs/half/checkpoints/checkpoint-99/trainer_state.json", Body=b"{}")
    result = run_job(env={**job_env, "QLORA_RUN_ID": "half", "QLORA_TRAIN__MAX_STEPS": "3",
                          "QLORA_VERIFY__REQUIRE_CHANGE": "false", "QLORA_VERIFY__MAX_NEW_TOKENS": "2"})
    assert "resuming from checkpoint" not in result.stdout


def _run_in_process(monkeypatch, env: dict) -> int:
    from job.__main__ import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QLORA_TERMINATION_LOG", "/dev/null")
    return main([])


def test_out_of_memory_exits_11_and_publishes_nothing(monkeypatch, job_env, s3, bucket, capsys):
    import torch
    from trl import SFTTrainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(SFTTrainer, "training_step", oom)
    assert _run_in_process(monkeypatch, {**job_env, "QLORA_RUN_ID": "oom"}) == ExitCode.OUT_OF_MEMORY
    assert ("out of GPU memory at step 0: set QLORA_TRAIN__PER_DEVICE_BATCH_SIZE=2 and QLORA_TRAIN__GRADIENT_ACCUMULATION_STEPS=2 "
            "(the same rows a step)") in capsys.readouterr().err
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/oom/").get("Contents")


def test_non_finite_loss_exits_12_and_publishes_nothing(monkeypatch, job_env, s3, bucket, capsys):
    import torch
    from trl import SFTTrainer

    real_loss = SFTTrainer.compute_loss

    def nan_after_three(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)  # NaN before backward, as a diverging run gets it
        return loss if self.state.global_step < 3 else loss * torch.tensor(float("nan"))

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_after_three)
    assert _run_in_process(monkeypatch, {**job_env, "QLORA_RUN_ID": "nan"}) == ExitCode.NON_FINITE_LOSS
    assert "non-finite loss nan (grad norm nan) at step 4" in capsys.readouterr().err
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/nan/").get("Contents")


@pytest.fixture
def faulty(s3_endpoint):
    from tests.faulty_s3 import FaultyS3

    proxy = FaultyS3(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.mark.long  # make test-long
def test_slow_and_erroring_s3_recovers_through_retries(s3, bucket, job_env, faulty):
    faulty.every = 3  # one request in three answers 503 SlowDown
    faulty.delay = 0.2  # and every request takes 200 ms more
    result = run_job(env={**job_env, "QLORA_RUN_ID": "flaky", "AWS_ENDPOINT_URL_S3": faulty.url})
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    assert faulty.injected >= 4
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/flaky/manifest.json")["Body"].read())
    for item in manifest["objects"]:
        assert s3.head_object(Bucket=bucket, Key=f"runs/flaky/{item['key']}")["ContentLength"] == item["size"]
    print(f"{faulty.injected} of {faulty.requests} requests failed; run published")


@pytest.mark.long  # make test-long (45 s)
def test_s3_gone_during_upload_exits_10_without_manifest_and_a_restart_completes(s3, bucket, job_env, faulty):
    env = {**job_env, "QLORA_RUN_ID": "gone", "AWS_ENDPOINT_URL_S3": faulty.url, "AWS_MAX_ATTEMPTS": "3"}
    faulty.down_after_put_matching = "/runs/gone/adapter/"
    result = run_job(env=env)
    assert result.returncode == ExitCode.STORAGE, result.stderr + result.stdout[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "s3://" in result.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/gone/").get("Contents", [])]
    assert keys and "runs/gone/manifest.json" not in keys, keys  # part of it went up, nothing claims it is whole
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")

    faulty.down, faulty.down_after_put_matching = False, None
    again = run_job(env=env)
    assert again.returncode == 0, again.stderr
    assert s3.head_object(Bucket=bucket, Key="runs/gone/manifest.json")


def test_no_secret_reaches_logs_manifest_metrics_or_termination_message(s3, bucket, job_env, tmp_path):
    secrets = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY", "QLORA_HF_TOKEN": "hf_NotARealTokenButSecret1234"}
    env = {**job_env, **secrets, "QLORA_RUN_ID": "secrets", "QLORA_TERMINATION_LOG": str(tmp_path / "termination-log"),
           "QLORA_CHECKPOINT__EVERY_STEPS": "50", "QLORA_LOG_LEVEL": "debug"}
    ok = run_job(env=env)
    assert ok.returncode == 0, ok.stderr
    failed = run_job(env={**env, "QLORA_RUN_ID": "secrets-fail", "QLORA_DATASET_URI": f"s3://{bucket}/absent.jsonl"})
    assert failed.returncode == 2
    outputs = [ok.stdout, ok.stderr, failed.stdout, failed.stderr, (tmp_path / "termination-log").read_text()]
    for item in s3.list_objects_v2(Bucket=bucket, Prefix="runs/").get("Contents", []):
        outputs.append(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode("utf-8", "replace"))
    config = run_job("config", env=env)
    outputs += [config.stdout, config.stderr]
    assert len(outputs) > 15  # adapter files, metrics, verify, manifest, checkpoints, logs
    for value in secrets.values():
        assert not any(value in text for text in outputs), value
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/secrets/manifest.json")["Body"].read())
    assert manifest["settings"]["hf_token"] == "**********"


def test_a_full_work_disk_gives_a_clear_error_and_publishes_nothing(s3, bucket, job_env, tmp_path):
    # A 64 KiB tmpfs as the work folder; the dataset alone does not fit. Needs root (CI runs as root).
    body = "".join(json.dumps({"instruction": f"Q{i}", "output": "A" * 200}) + "\n" for i in range(400))
    s3.put_object(Bucket=bucket, Key="data/big.jsonl", Body=body.encode())
    work = tmp_path / "small-disk"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(work)], check=True)
    try:
        result = run_job(env={**job_env, "QLORA_RUN_ID": "full", "QLORA_WORK_DIR": str(work),
                              "QLORA_DATASET_URI": f"s3://{bucket}/data/big.jsonl"})
    finally:
        subprocess.run(["umount", str(work)], check=True)
    assert result.returncode == ExitCode.STORAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in result.stdout, result.stderr
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/full/").get("Contents")
