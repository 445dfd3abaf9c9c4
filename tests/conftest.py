"""Fixtures that build real things: an S3 server on loopback, a tiny model, a clean env."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "job" / "sample" / "6g_ai_qa.jsonl"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real moto S3 server on a free loopback port for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Point boto3 (in this process and in subprocesses) at the loopback server."""
    env = {**S3_ENV, "AWS_ENDPOINT_URL_S3": s3_endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3(s3_env):
    import boto3

    return boto3.client("s3")


@pytest.fixture
def bucket(s3, request):
    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from job.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def clean_env(monkeypatch):
    """No QLORA_* variables from the developer's shell leak into a test."""
    for key in list(os.environ):
        if key.upper().startswith("QLORA_"):
            monkeypatch.delenv(key)


def run_job(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m job ARGS` as a subprocess with exactly the given QLORA_*/AWS_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(("QLORA_", "AWS_"))}
    base.setdefault("QLORA_TERMINATION_LOG", "/dev/null")
    return subprocess.run(
        [sys.executable, "-m", "job", *args], env={**base, "QLORA_LOG_FORMAT": "json", **env},
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
