"""Bad input, end to end: each case is one `python -m job` against a real S3 server and must
give its exit code, one line on stderr naming the problem, and publish nothing.
docs/bad-input.md keeps the table of these cases and outcomes (a test checks it lists them all)."""

import gzip
import json

import pytest
import zstandard

from tests.conftest import REPO, run_job

GOOD = json.dumps({"instruction": "What does RIS steer?", "output": "Radio waves."})
SHARDS = "s3://{bucket}/data/shards/"  # a case whose dataset is a dict of keys under data/shards/ reads this prefix

# id: (dataset bytes, {key under data/shards/: bytes}, or None to keep the good one, extra env, exit code, text in the message)
CASES = {
    "truncated-json": (b'{"instruction": "Q", "output": "A', {}, 3, "line 1: invalid JSON"),
    "not-json": (b"instruction=Q output=A\n", {}, 3, "invalid JSON"),
    "non-utf8": (b'{"instruction": "Q", "output": "' + b"\xff\xfe" + b'"}\n', {}, 3, "not valid UTF-8"),
    "empty-file": (b"", {}, 3, "dataset has no usable rows (0 rejected)"),
    "only-blank-lines": (b"\n\n  \n", {}, 3, "no usable rows"),
    "array-row": (b'["Q", "A"]\n', {}, 3, "expected a JSON object, got array"),
    "wrong-type": (b'{"instruction": ["Q"], "output": "A"}\n', {}, 3, "'instruction' must be a string, got array"),
    "missing-field": (b'{"instruction": "Q"}\n', {}, 3, "missing 'output'"),
    "empty-answer": (b'{"instruction": "Q", "output": "  "}\n', {}, 3, "'output' is empty"),
    "unknown-fields": (b'{"question": "Q", "answer": "A"}\n', {}, 3, "no known fields"),
    "duplicate-keys": (b'{"instruction": "Q", "output": "A", "output": "B"}\n', {}, 3, "duplicate key 'output'"),
    "unknown-role": (b'{"messages": [{"role": "human", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n', {}, 3,
                     "role 'human' is not one of system, user, assistant"),
    "no-assistant-turn": (b'{"messages": [{"role": "user", "content": "Q"}]}\n', {}, 3, "must be from the assistant"),
    "nan-literal": (b'{"instruction": "Q", "output": NaN}\n', {}, 3, "NaN is not allowed"),
    "nul-character": (b'{"instruction": "Q\\u0000", "output": "A"}\n', {}, 3, "NUL character"),
    "mixed-formats": (b'{"instruction": "Q", "output": "A", "prompt": "P", "completion": "C"}\n', {}, 3, "mixes formats"),
    "one-bad-row-of-two": ((GOOD + "\n{oops\n").encode(), {}, 3, "1 of 2 rows rejected (50.0% > QLORA_DATA__MAX_REJECT_RATIO=0.0)"),
    "rows-longer-than-max-seq-length": ((GOOD + "\n").encode(), {"QLORA_MODEL__MAX_SEQ_LENGTH": "16"}, 3,
                                        "tokens is longer than QLORA_MODEL__MAX_SEQ_LENGTH=16"),
    "empty-prefix": ({"_SUCCESS": b""}, {}, 3, "data/shards/: no JSONL shards under this prefix"),
    "corrupt-gzip-member": ({"part-0.jsonl": (GOOD + "\n").encode(), "part-1.jsonl.gz": gzip.compress((GOOD + "\n").encode())[:-12]},
                            {}, 3, "data/shards/part-1.jsonl.gz: corrupt gzip data after 0 lines"),
    "corrupt-zstd-frame": ({"part-0.jsonl.zst": zstandard.ZstdCompressor().compress((GOOD + "\n").encode() * 50)[:-9]}, {}, 3,
                           "data/shards/part-0.jsonl.zst: corrupt zstd data"),
    "shard-not-jsonl": ({"part-0.jsonl": (GOOD + "\n").encode(), "part-1.csv": b"q,a\n"}, {}, 3,
                        "data/shards/part-1.csv: not a JSONL shard"),
    "lone-surrogate": (b'{"instruction": "Q\\ud800", "output": "A"}\n', {}, 3, "line 1: holds a lone surrogate escape"),
    "zstd-bomb": ({"part-0.jsonl.zst": zstandard.ZstdCompressor(level=9).compress(b"\n" * (1 << 20)) * 1024}, {}, 3,
                  "data/shards/part-0.jsonl.zst: decompresses to more than 100 times its compressed size"),
    "gzip-named-jsonl": ({"part-0.jsonl": gzip.compress((GOOD + "\n").encode())}, {}, 3,
                         "part-0.jsonl: holds gzip-compressed data but its name does not end .gz"),
    "zero-weight": (None, {"QLORA_DATASET_URI": '[{"uri": "s3://{bucket}/data/train.jsonl", "weight": 0}]'}, 2,
                    "QLORA_DATASET_URI: weight of s3://"),
    "dataset-list-not-json": (None, {"QLORA_DATASET_URI": '["s3://{bucket}/data/train.jsonl"'}, 2,
                              "QLORA_DATASET_URI: is not a valid JSON list"),
    "missing-dataset-uri": (None, {"QLORA_DATASET_URI": None}, 2, "QLORA_DATASET_URI is required"),
    "unsupported-uri-scheme": (None, {"QLORA_DATASET_URI": "gs://bucket/train.jsonl"}, 2, "unsupported scheme 'gs://'"),
    "invalid-bucket-name": (None, {"QLORA_OUTPUT_URI": "s3://My_Bucket/runs"}, 2, "QLORA_OUTPUT_URI"),
    "missing-bucket": (None, {"QLORA_DATASET_URI": "s3://no-such-bucket-anywhere/train.jsonl"}, 2, "s3://no-such-bucket-anywhere/train.jsonl"),
    "missing-object": (None, {"QLORA_DATASET_URI": "s3://{bucket}/absent.jsonl"}, 2, "/absent.jsonl: not found"),
    "missing-local-file": (None, {"QLORA_DATASET_URI": "/nonexistent/train.jsonl"}, 2, "/nonexistent/train.jsonl: not found"),
    "typo-in-setting": (None, {"QLORA_TRAIN__LEARNIG_RATE": "1e-4"}, 2, "did you mean QLORA_TRAIN__LEARNING_RATE"),
    "wrong-type-setting": (None, {"QLORA_LORA__R": "sixteen"}, 2, "QLORA_LORA__R"),
    "negative-learning-rate": (None, {"QLORA_TRAIN__LEARNING_RATE": "-2e-4"}, 2, "QLORA_TRAIN__LEARNING_RATE"),
    "reject-ratio-above-one": (None, {"QLORA_DATA__MAX_REJECT_RATIO": "1.5"}, 2, "QLORA_DATA__MAX_REJECT_RATIO"),
    "bad-run-id": (None, {"QLORA_RUN_ID": "run/../../etc"}, 2, "QLORA_RUN_ID"),
    "list-setting-not-json": (None, {"QLORA_VERIFY__PROMPTS": "hello"}, 2, "QLORA_VERIFY__PROMPTS: must be JSON"),
    "probe-missing-prompt": (None, {"QLORA_VERIFY__PROMPTS": '[{"expected": "x"}]'}, 2, "QLORA_VERIFY__PROMPTS"),
    "unsloth-without-gpu": (None, {"QLORA_ENGINE": "unsloth"}, 2, "QLORA_ENGINE=unsloth"),
    "gpu-requested-none-visible": (None, {"QLORA_REQUIRE_GPU": "true"}, 2, "GPUs were requested (QLORA_REQUIRE_GPU=true) but CUDA sees none"),
    "missing-base-model": (None, {"QLORA_MODEL__NAME": "/models/absent"}, 5, "cannot load base model '/models/absent'"),
    "access-denied": (None, {"deny": "1"}, 2, "AccessDenied"),
    "report-to-not-installed": (None, {"QLORA_METRICS__REPORT_TO": '["wandb"]'}, 2, "wandb is not installed"),
    "eval-gate-without-eval-set": (None, {"QLORA_EVAL__REQUIRE_IMPROVEMENT": "true"}, 2, "needs an evaluation set"),
    "eval-fraction-leaves-no-row": ((GOOD + "\n").encode(), {"QLORA_EVAL__FRACTION": "0.5"}, 2, "leaves no evaluation or no training row"),
    "gguf-without-merged": (None, {"QLORA_EXPORT__GGUF": "try"}, 2, "QLORA_EXPORT__GGUF needs QLORA_EXPORT__MERGED=true"),
    "nothing-to-verify": (None, {"QLORA_VERIFY__TRAIN_PROBES": "0"}, 2, "nothing to verify: set QLORA_VERIFY__PROMPTS"),
    "bad-nproc": (None, {"QLORA_NPROC_PER_NODE": "two"}, 2, "QLORA_NPROC_PER_NODE"),
}


@pytest.fixture
def env(s3, bucket, s3_env, tiny_model, tmp_path):
    return {**s3_env, "HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": f"s3://{bucket}/data/train.jsonl",
            "QLORA_OUTPUT_URI": f"s3://{bucket}/runs", "QLORA_MODEL__NAME": str(tiny_model),
            "QLORA_WORK_DIR": str(tmp_path / "work"), "QLORA_RUN_ID": "bad", "QLORA_TRAIN__MAX_STEPS": "2"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_its_exit_code_one_line_and_publishes_nothing(case, s3, bucket, env, s3_endpoint):
    dataset, extra, code, message = CASES[case]
    extra = dict(extra)
    if isinstance(dataset, dict):
        for item in s3.list_objects_v2(Bucket=bucket, Prefix="data/shards/").get("Contents", []):  # the bucket outlives a case
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        for name, body in dataset.items():
            s3.put_object(Bucket=bucket, Key=f"data/shards/{name}", Body=body)
        extra.setdefault("QLORA_DATASET_URI", SHARDS)
    else:
        s3.put_object(Bucket=bucket, Key="data/train.jsonl", Body=dataset if dataset is not None else (GOOD + "\n").encode())
    proxy = None
    if extra.pop("deny", None):
        from tests.faulty_s3 import FaultyS3

        proxy = FaultyS3(s3_endpoint)
        proxy.deny = True
        env["AWS_ENDPOINT_URL_S3"] = proxy.url
    for key, value in extra.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value.replace("{bucket}", bucket)
    try:
        result = run_job(env=env)
    finally:
        if proxy:
            proxy.close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert message in lines[0], lines[0]
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/").get("Contents")


def test_a_byte_order_mark_is_tolerated(s3, bucket, env):
    s3.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b"\xef\xbb\xbf" + (GOOD + "\n").encode())
    result = run_job("validate-data", f"s3://{bucket}/data/train.jsonl", env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["accepted"] == 1


def test_a_100_mb_single_line_is_rejected_without_holding_it(env, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.write(b'{"instruction": "Q", "output": "')
        for _ in range(100):
            f.write(b"x" * (1 << 20))
        f.write(b'"}\n')
    result = run_job(env={**env, "QLORA_DATASET_URI": str(big)})
    assert result.returncode == 3
    assert "line 1: line is longer than 1048576 bytes (QLORA_DATA__MAX_LINE_BYTES)" in result.stderr


def test_the_docs_table_lists_every_case():
    doc = (REPO / "docs" / "bad-input.md").read_text()
    missing = [case for case in CASES if f"`{case}`" not in doc]
    assert not missing, missing
