"""S3 side of `make kind-e2e`, run on the host through a port-forward to the in-cluster MinIO.
    python k8s/kind/e2e_s3.py seed  ENDPOINT      bucket, bundled sample data, tiny model
    python k8s/kind/e2e_s3.py check ENDPOINT RUN  manifest present, every object's sha256 matches"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import boto3

from job.tiny import SAMPLE_DATA, make_tiny_model

BUCKET = "qlora"


def client(endpoint: str):
    # The throwaway credentials of k8s/kind/minio.yaml.
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="qlora-e2e",
                        aws_secret_access_key=os.environ.get("E2E_SECRET", "qlora-e2e-not-a-secret"))


def seed(s3) -> None:
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(SAMPLE_DATA), BUCKET, "data/6g_ai_qa.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_tiny_model(Path(tmp) / "tiny").iterdir():
            s3.upload_file(str(path), BUCKET, f"base/tiny-qwen3/{path.name}")
    print("seeded s3://qlora/data and s3://qlora/base/tiny-qwen3")


def check(s3, run_id: str) -> None:
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}/manifest.json")["Body"].read())
    for item in manifest["objects"]:
        body = s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}/{item['key']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == item["sha256"], item["key"]
    print(f"manifest ok: {len(manifest['objects'])} objects, loss {manifest['loss']['first']:.3f} -> {manifest['loss']['last']:.3f}")


if __name__ == "__main__":
    command, endpoint = sys.argv[1], sys.argv[2]
    seed(client(endpoint)) if command == "seed" else check(client(endpoint), sys.argv[3])
