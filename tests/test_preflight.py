"""`qlora-job plan` against a real S3 server: the pre-flight report, its exit codes, and a run that
does what the plan said."""

import json

import pytest

from job.errors import ExitCode
from tests.conftest import run_job
from tests.test_e2e import FACTS, _events

ROWS = [json.dumps({"instruction": f"{q} (variant {i})", "output": a}) for i in range(10) for q, a in FACTS]


@pytest.fixture
def plan_env(s3, bucket, s3_env, tiny_model, tmp_path):
    """40 rows over two shards and the tiny model, both on S3."""
    s3.put_object(Bucket=bucket, Key="data/part-0.jsonl", Body=("\n".join(ROWS[:25]) + "\n").encode())
    s3.put_object(Bucket=bucket, Key="data/part-1.jsonl", Body=("\n".join(ROWS[25:]) + "\n").encode())
    for path in tiny_model.iterdir():
        s3.upload_file(str(path), bucket, f"base/tiny/{path.name}")
    return {**s3_env, "HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": f"s3://{bucket}/data/", "QLORA_OUTPUT_URI": f"s3://{bucket}/runs",
            "QLORA_MODEL__NAME": f"s3://{bucket}/base/tiny", "QLORA_MODEL__CACHE_DIR": str(tmp_path / "cache"),
            "QLORA_WORK_DIR": str(tmp_path / "work"), "QLORA_RUN_ID": "planned", "QLORA_TRAIN__EPOCHS": "60",
            "QLORA_TRAIN__MAX_STEPS": "150", "QLORA_TRAIN__LEARNING_RATE": "1e-2", "QLORA_TRAIN__WARMUP_STEPS": "5",
            "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "QLORA_VERIFY__TRAIN_PROBES": "2"}


def test_the_plan_reads_no_weights_leaves_nothing_behind_and_the_run_trains_what_it_said(s3, bucket, plan_env, tmp_path):
    result = run_job("plan", env=plan_env)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)  # stdout is the report alone; logs went to stderr
    assert (plan["data"]["accepted"], plan["data"]["shards"], plan["output_writable"], plan["base_model"]["readable"]) == (40, 2, True, True)
    assert plan["tokens"]["rows_over_max_seq_length"] == 0 and plan["tokens"]["longest_row"] >= plan["tokens"]["mean_row"] > 0
    training = plan["training"]
    assert (training["epochs"], training["examples"], training["rows_per_step"], training["learning_rate"]) == (60.0, 40, 16, 1e-2)
    assert (training["steps_per_epoch"], training["max_steps"], training["steps"]) == (3, 150, 150)  # 60 epochs, capped
    assert plan["estimate"]["train_seconds"] > 0 and plan["estimate"]["peak_gpu_memory_gib"] > 0
    fetched = next(e for e in _events(result.stderr) if e["event"] == "base model files fetched, weights left out")["files"]
    assert "config.json" in fetched and not any(name.endswith(".safetensors") for name in fetched)
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/").get("Contents"), "the write probe is deleted"
    assert not any((tmp_path / "work").iterdir()), "the plan's scratch folder is removed"

    run = run_job(env=plan_env)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/planned/manifest.json")["Body"].read())
    assert manifest["duration"]["steps_trained"] == training["steps"]
    assert manifest["dataset"]["sha256"] == plan["data"]["sha256"]


@pytest.mark.parametrize(("change", "code", "message"), [
    ({"rows": b'{"instruction": "Q"}\n'}, ExitCode.DATA, "line 1 of s3://"),
    ({"QLORA_MODEL__MAX_SEQ_LENGTH": "16"}, ExitCode.DATA, "tokens is longer than QLORA_MODEL__MAX_SEQ_LENGTH=16"),
    ({"QLORA_MODEL__NAME": "s3://{bucket}/base/absent"}, ExitCode.MODEL_LOAD, "base/absent"),
    ({"QLORA_OUTPUT_URI": "s3://no-such-bucket-for-plans/runs"}, ExitCode.CONFIG, "no-such-bucket-for-plans"),
    ({"QLORA_TRAIN__LEARNIG_RATE": "1"}, ExitCode.CONFIG, "did you mean QLORA_TRAIN__LEARNING_RATE"),
])
def test_a_plan_that_finds_a_problem_exits_with_the_jobs_code_and_one_line(s3, bucket, plan_env, change, code, message):
    change = dict(change)
    if "rows" in change:
        s3.put_object(Bucket=bucket, Key="data/part-1.jsonl", Body=change.pop("rows"))
    env = {**plan_env, **{k: v.replace("{bucket}", bucket) for k, v in change.items()}}
    result = run_job("plan", env=env)
    assert result.returncode == code, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qlora-job: error: ") and message in last, last
    assert result.stdout == "" and "Traceback" not in result.stderr
