"""The cpu image, run as Kubernetes would run it (non-root, read-only root filesystem, only
environment variables), against an S3 server on loopback. `make container-test` builds the
image and runs this; it needs a Docker engine, so the default suite deselects it."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
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


# The cuda image: built and checked here (no GPU here; its GPU run is the GPU tests' versions).
CUDA_IMAGE = os.environ.get("CUDA_IMAGE", "qlora-job:cuda")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "qlora-job-base:bookworm")
LOCKS = REPO / "requirements"
NON_ROOT = ["--read-only", "--tmpfs", "/tmp:exec,mode=1777", "--user", "1000:0", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges"]


def pinned(lock: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a uv-compiled lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(" ")[0].split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def installed(image: str) -> dict[str, str]:
    script = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower():"
              " d.version for d in m.distributions()}))")
    result = docker("run", "--rm", *NON_ROOT, "--entrypoint", "python", image, "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("image, lock", [(CUDA_IMAGE, "cuda.txt"), (IMAGE, "cpu.txt")])
def test_image_holds_exactly_its_lock_file_and_passes_pip_check(image, lock):
    assert docker("image", "inspect", image).returncode == 0, f"build it first: make container-test ({image})"
    versions = installed(image)
    pins = pinned(LOCKS / lock)
    assert {"torch", "transformers", "trl", "peft"} <= pins.keys()
    extra = set(versions) - set(pins) - {"pip", "qlora-job"}  # pip: the venv's own, never imported by the job
    assert not extra, f"installed but not in {lock}: {sorted(extra)}"
    assert {name: versions.get(name) for name in pins} == pins
    check = docker("run", "--rm", *NON_ROOT, "--entrypoint", "pip", image, "check")
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr


def test_cuda_image_pins_the_gpu_tests_versions():
    """The versions the GPU tests ran (bench/RESULTS.md runs 18-27): torch 2.11.0 with CUDA 13."""
    pins = pinned(LOCKS / "cuda.txt")
    assert {k: pins[k] for k in ("torch", "transformers", "trl", "peft", "unsloth", "unsloth-zoo", "bitsandbytes", "datasets")} == {
        "torch": "2.11.0", "transformers": "5.17.0", "trl": "1.14.2", "peft": "0.21.2", "unsloth": "2026.10.9",
        "unsloth-zoo": "2026.10.9", "bitsandbytes": "0.50.2", "datasets": "4.8.5"}
    result = docker("run", "--rm", *NON_ROOT, "--entrypoint", "python", CUDA_IMAGE, "-c",
                    "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2.11.0+cu130", "13.0", "False"]


def test_cuda_image_compiles_a_python_extension_as_triton_does():
    """Triton builds a small C launcher against Python.h at run time; cc and the headers must be there,
    usable by the non-root user on a read-only root (the build goes to /tmp)."""
    script = """set -e
cat > /tmp/probe.c <<'C'
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_probe(void) { PyObject *m = PyModule_Create(&def); PyModule_AddIntConstant(m, "answer", 42); return m; }
C
inc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
cc -shared -fPIC -O2 -I"$inc" /tmp/probe.c -o /tmp/probe$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
cd /tmp && python -c 'import probe; print(probe.answer)'
python -c 'import triton, shutil; print(triton.__version__, shutil.which("cc"))'"""
    result = docker("run", "--rm", *NON_ROOT, "--entrypoint", "sh", CUDA_IMAGE, "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["42", "3.6.0", "/usr/bin/cc"]


def test_cuda_image_tool_commands_run_non_root_on_a_read_only_root():
    user = docker("image", "inspect", "--format", "{{.Config.User}}", CUDA_IMAGE).stdout.strip()
    assert user == "1000:0"
    env = ["--env=QLORA_DATASET_URI=s3://bucket/data.jsonl", "--env=QLORA_OUTPUT_URI=s3://bucket/runs",
           "--env=AWS_SECRET_ACCESS_KEY=do-not-print-me"]
    codes = docker("run", "--rm", *NON_ROOT, CUDA_IMAGE, "exit-codes")
    assert codes.returncode == 0, codes.stderr[-2000:]
    from job.errors import EXIT_CODES

    assert {int(k) for k in json.loads(codes.stdout)} == {int(c) for c in EXIT_CODES}
    config = docker("run", "--rm", *NON_ROOT, *env, CUDA_IMAGE, "config")
    assert config.returncode == 0, config.stderr[-2000:]
    settings = json.loads(config.stdout)
    assert settings["dataset_uri"] == "s3://bucket/data.jsonl" and settings["engine"] == "auto"
    assert "do-not-print-me" not in config.stdout + config.stderr
    # Bad input: the one-line error and its code, through tini, with no traceback.
    bad = docker("run", "--rm", *NON_ROOT, "--env=QLORA_TRAIN__MAX_STEPS=many", *env, CUDA_IMAGE, "config")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_base_stage_builds_on_a_base_whose_uid_1000_is_taken(tmp_path):
    """nvidia/cuda's Ubuntu 24.04 bases ship user `ubuntu` with uid 1000: the base stage must not fail there."""
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN useradd --uid 1000 --create-home ubuntu\n")
    clash = "qlora-job-test:uid-1000-taken"
    made = docker("build", "-q", "-t", clash, str(tmp_path))
    assert made.returncode == 0, made.stderr[-2000:]
    built = subprocess.run(["docker", "build", "-q", "--target", "base", "--build-arg", f"BASE_IMAGE={clash}",
                            "-t", "qlora-job-test:base-on-clash", "-f", str(REPO / "Dockerfile"), str(tmp_path)],
                           capture_output=True, text=True, timeout=900, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert built.returncode == 0, built.stderr[-2000:]
    who = docker("run", "--rm", "--user", "1000:0", "qlora-job-test:base-on-clash", "sh", "-c", "id -u; getent passwd 1000 | cut -d: -f1")
    assert who.stdout.split() == ["1000", "ubuntu"]
