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


def test_the_plan_sizes_an_8b_model_for_a_named_card_from_its_config_alone(tiny_model, tmp_path):
    """No weights at all: a Qwen3-8B config.json beside a tokenizer. On an L4 the micro-batch needs checkpointing,
    on an H100 it fits without; CUDA graphs stay off on both (an 8B step is the GPU's, not the host's)."""
    import shutil

    from job.plan import FIRST_STEP_SECONDS, GPUS

    model = tmp_path / "qwen3-8b-config-only"
    model.mkdir()
    for path in tiny_model.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, model / path.name)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=151936, tie_word_embeddings=False)
    (model / "config.json").write_text(json.dumps(config))
    broken = run_job("plan", env={"HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": str(tmp_path / "x.jsonl"),
                                  "QLORA_OUTPUT_URI": str(tmp_path / "out"), "QLORA_MODEL__NAME": str(model)})
    assert broken.returncode == ExitCode.MODEL_LOAD and "must be equal to the number of `layer_types`" in broken.stderr, \
        "a config.json its class refuses is a model load error (it was exit 1)"
    config.pop("layer_types", None)
    (model / "config.json").write_text(json.dumps(config))
    long_answer = " ".join(a for _, a in FACTS) * 12
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"instruction": q, "output": long_answer}) for q, _ in FACTS * 8) + "\n")
    env = {"HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": str(tmp_path / "train.jsonl"), "QLORA_OUTPUT_URI": str(tmp_path / "out"),
           "QLORA_MODEL__NAME": str(model), "QLORA_WORK_DIR": str(tmp_path / "work")}
    plans = {}
    for gpu in ("L4", "H100"):
        result = run_job("plan", "--gpu", gpu, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        plans[gpu] = json.loads(result.stdout)
    for gpu, checkpointing in (("L4", True), ("H100", False)):
        training, estimate = plans[gpu]["training"], plans[gpu]["estimate"]
        assert (estimate["gpu"], estimate["model_params"]) == (gpu, 8_190_427_136)
        assert (training["gradient_checkpointing"], training["cuda_graphs"]) == (checkpointing, False)
        assert training["micro_batch_tokens"] >= 16 * plans[gpu]["tokens"]["longest_row"] > 0
        assert 6.3 < estimate["peak_gpu_memory_gib"] < 0.85 * GPUS[gpu][0] and estimate["train_seconds"] > 0
    # Beside step 1's compiles (the same on both: FIRST_STEP_SECONDS), an L4's steps are ~8x an H100's.
    steps = {gpu: plans[gpu]["estimate"]["train_seconds"] - FIRST_STEP_SECONDS for gpu in plans}
    assert steps["L4"] > 2 * steps["H100"] > 0, "an L4 is ~8x slower"
    unknown = run_job("plan", "--gpu", "TPU", env=env)
    assert unknown.returncode == ExitCode.CONFIG and "QLORA_PLAN__GPU" in unknown.stderr
