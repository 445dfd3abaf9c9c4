"""`make demo`: one real run on an embedded default, start to finish, on CPU.

Starts a local S3 server (moto) on loopback, uploads the bundled sample data and a
tiny Qwen3 model, runs `python -m job` with environment variables exactly as the
container gets them, prints a summary, and stops the server."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from job.tiny import SAMPLE_DATA, make_tiny_model

# The tiny random model needs a higher learning rate than a real one (2e-4) to
# learn anything in a few hundred steps: 300 steps x 8 rows = 2,400 rows, ~37 epochs.
DEMO_SETTINGS = {
    # 8 rows a step: the fast recipe's 16k-token budget would put all 64 rows in every step.
    "QLORA_TRAIN__PER_DEVICE_BATCH_SIZE": "8",
    "QLORA_TRAIN__MAX_STEPS": os.environ.get("DEMO_STEPS", "300"),
    "QLORA_TRAIN__LEARNING_RATE": "1e-2",
    "QLORA_TRAIN__LOGGING_STEPS": "25",
    "QLORA_VERIFY__MAX_NEW_TOKENS": "96",
}


def start_local_s3():
    """A moto S3 server on a free loopback port, with this process's boto3 pointed at it.
    Returns (server, the AWS_* variables a child process needs)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local-secret",
           "AWS_REGION": "us-east-1"}
    os.environ.update(aws)
    return server, aws


def main() -> int:
    import boto3

    server, aws = start_local_s3()
    started = time.perf_counter()
    try:
        s3 = boto3.client("s3")
        for bucket in ("data", "models"):
            s3.create_bucket(Bucket=bucket)
        s3.upload_file(str(SAMPLE_DATA), "data", "6g_ai_qa.jsonl")
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = make_tiny_model(Path(tmp) / "tiny-qwen3")
            for path in model_dir.iterdir():
                s3.upload_file(str(path), "models", f"base/tiny-qwen3/{path.name}")
            run_id = time.strftime("demo-%Y%m%d-%H%M%S")
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")},
                **aws,
                "QLORA_DATASET_URI": "s3://data/6g_ai_qa.jsonl",
                "QLORA_OUTPUT_URI": "s3://models/runs",
                "QLORA_MODEL__NAME": "s3://models/base/tiny-qwen3",
                "QLORA_RUN_ID": run_id,
                "QLORA_WORK_DIR": str(Path(tmp) / "work"),
                "QLORA_MODEL__CACHE_DIR": str(Path(tmp) / "models"),
                "QLORA_TERMINATION_LOG": str(Path(tmp) / "termination-log"),
                **DEMO_SETTINGS,
            }
            print("$ " + " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("QLORA_")) + " python -m job", flush=True)
            code = subprocess.call([sys.executable, "-m", "job"], env=env)
        if code != 0:
            print(f"\ndemo: the job exited {code}", file=sys.stderr)
            return code
        _summary(s3, run_id, time.perf_counter() - started)
        return 0
    finally:
        server.stop()


def _summary(s3, run_id: str, seconds: float) -> None:
    def read(key: str) -> dict:
        return json.loads(s3.get_object(Bucket="models", Key=f"runs/{run_id}/{key}")["Body"].read())

    manifest, metrics, verify = read("manifest.json"), read("metrics.json"), read("verify.json")
    print(f"\n== demo finished in {seconds:.0f} s ==")
    print(f"adapter:  s3://models/runs/{run_id}/adapter/  ({len(manifest['objects'])} objects in manifest.json)")
    print(f"loss:     {metrics['loss_first']:.3f} at step 1 -> {metrics['loss_last']:.3f} at step {metrics['steps']}")
    print(f"speed:    {metrics['tokens_per_second']:.0f} tokens/s on CPU, {metrics['train_seconds']:.0f} s training")
    for probe in verify["probes"]:
        print(f"\nQ: {probe['prompt']}\nbase:  {probe['base_answer'][:160]!r}\ntuned: {probe['answer'][:160]!r}")


if __name__ == "__main__":
    sys.exit(main())
