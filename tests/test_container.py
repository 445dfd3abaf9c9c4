"""The cpu image, run as Kubernetes would run it (non-root, read-only root filesystem, only
environment variables), against an S3 server on loopback. `make container-test` builds the
image and runs this; it needs a Docker engine, so the default suite deselects it."""

import json
import os
import subprocess
import time

import pytest

from tests.test_e2e import FACTS

pytestmark = pytest.mark.container
IMAGE = os.environ.get("CONTAINER_IMAGE", "qlora-job:cpu-dev")


def docker(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def test_cpu_image_runs_the_job_to_a_published_manifest(s3, bucket, s3_env, tiny_model):
    assert docker("image", "inspect", IMAGE).returncode == 0, f"build it first: make image-cpu ({IMAGE})"
    body = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS)
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body.encode())
    for path in tiny_model.iterdir():
        s3.upload_file(str(path), bucket, f"base/tiny/{path.name}")
    env = {**s3_env, "QLORA_DATASET_URI": f"s3://{bucket}/data/facts.jsonl", "QLORA_OUTPUT_URI": f"s3://{bucket}/runs",
           "QLORA_MODEL__NAME": f"s3://{bucket}/base/tiny", "QLORA_RUN_ID": "container-1", "HF_HUB_OFFLINE": "1",
           "QLORA_TRAIN__MAX_STEPS": "150", "QLORA_TRAIN__LEARNING_RATE": "1e-2", "QLORA_VERIFY__MAX_NEW_TOKENS": "32"}
    started = time.monotonic()
    result = docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp:exec,mode=1777",
                    "--user", "1000:0", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                    *[f"--env={k}={v}" for k, v in env.items()], IMAGE)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/container-1/manifest.json")["Body"].read())
    assert manifest["engine"] == "transformers" and any(o["key"] == "adapter/adapter_model.safetensors" for o in manifest["objects"])
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    print(f"container run: {elapsed:.1f} s")

    # The same run again: the manifest exists, so it exits 0 at once.
    again = docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", "1000:0",
                   *[f"--env={k}={v}" for k, v in env.items()], IMAGE)
    assert again.returncode == 0 and "already published" in again.stdout

    # Bad input gets its exit code through tini.
    bad = docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", "1000:0",
                 *[f"--env={k}={v}" for k, v in env.items() if k != "QLORA_DATASET_URI"], IMAGE)
    assert bad.returncode == 2 and "QLORA_DATASET_URI is required" in bad.stderr
