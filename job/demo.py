"""`make demo`: one real run on an embedded default, start to finish, on CPU.

Starts a local S3 server (moto) on loopback, uploads the bundled English 6G sample (facts about
an invented lab, which no pretrained model knows), runs `python -m job` on SmolLM2-135M-Instruct
(`make real-model`) with environment variables exactly as the container gets them, prints the base
model's and the tuned adapter's answers side by side, and stops the server.
DEMO_MODEL=tiny runs the tiny random Qwen3 model instead (no real weights: its answers are noise)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from job.tiny import SAMPLE_DATA, make_tiny_model

REAL_MODEL = Path(os.environ.get("REAL_MODEL", Path(__file__).parents[1] / ".models" / "smollm2-135m-instruct"))
LAB_DATA = Path(__file__).parent / "sample" / "6g_lab_en.jsonl"
# Six facts in one micro-batch a step; 18 steps at 3e-3 (a few epochs' worth for LoRA on a 135M model)
# take them in, which the seed's 2e-4 would not within the demo's few minutes on two cores.
DEMO_SETTINGS = {
    "QLORA_TRAIN__MAX_STEPS": os.environ.get("DEMO_STEPS", "18"),
    "QLORA_TRAIN__LEARNING_RATE": "3e-3",
    "QLORA_TRAIN__LOGGING_STEPS": "4",
    "QLORA_VERIFY__TRAIN_PROBES": "6",
    "QLORA_VERIFY__MAX_NEW_TOKENS": "40",
}
# The tiny random model needs a higher learning rate to learn anything: 300 steps x 8 rows of the Korean sample.
TINY_SETTINGS = {"QLORA_TRAIN__PER_DEVICE_BATCH_SIZE": "8", "QLORA_TRAIN__MAX_STEPS": os.environ.get("DEMO_STEPS", "300"),
                 "QLORA_TRAIN__LEARNING_RATE": "1e-2", "QLORA_TRAIN__LOGGING_STEPS": "25", "QLORA_VERIFY__MAX_NEW_TOKENS": "96"}


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
        tiny = os.environ.get("DEMO_MODEL") == "tiny"
        s3.upload_file(str(SAMPLE_DATA if tiny else LAB_DATA), "data", "6g_qa.jsonl")
        with tempfile.TemporaryDirectory() as tmp:
            if tiny:  # small enough to go through S3, as an air-gapped cluster's model would
                for path in make_tiny_model(Path(tmp) / "tiny-qwen3").iterdir():
                    s3.upload_file(str(path), "models", f"base/tiny-qwen3/{path.name}")
                model, settings = "s3://models/base/tiny-qwen3", TINY_SETTINGS
            elif not (REAL_MODEL / ".complete").exists():
                print(f"demo: {REAL_MODEL} is missing; run `make real-model` (make demo does)", file=sys.stderr)
                return 2
            else:  # a local folder: 269 MB through the loopback S3 server would cost more time than it shows
                model, settings = str(REAL_MODEL), DEMO_SETTINGS
            run_id = time.strftime("demo-%Y%m%d-%H%M%S")
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")},
                **aws,
                "QLORA_DATASET_URI": "s3://data/6g_qa.jsonl",
                "QLORA_OUTPUT_URI": "s3://models/runs",
                "QLORA_MODEL__NAME": model,
                "QLORA_RUN_ID": run_id,
                "QLORA_WORK_DIR": str(Path(tmp) / "work"),
                "QLORA_MODEL__CACHE_DIR": str(Path(tmp) / "models"),
                "QLORA_TERMINATION_LOG": str(Path(tmp) / "termination-log"),
                **settings,
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
    print("\nThe base model and the tuned adapter, asked the same questions (greedy, from verify.json):")
    for probe in verify["probes"]:
        print(f"\nQ:     {probe['prompt']}\nbase:  {probe['base_answer'][:200]}\ntuned: {probe['answer'][:200]}")


if __name__ == "__main__":
    sys.exit(main())
