import json

import pytest

from job.errors import ConfigError, ExitCode
from job.plan import batch_plan
from job.settings import SEVEN_PROJECTIONS, env_docs, load_settings
from tests.conftest import REPO, run_job

REQUIRED = {"QLORA_DATASET_URI": "s3://data/train.jsonl", "QLORA_OUTPUT_URI": "s3://models/runs"}


def test_defaults_are_the_seed_tutorials_recipe(clean_env, monkeypatch):
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert (s.lora.r, s.lora.alpha, s.lora.dropout, s.lora.target_modules) == (16, 16, 0.0, SEVEN_PROJECTIONS)
    assert s.lora.gradient_checkpointing == "auto"
    t = s.train
    assert t.recipe == "fast" and (t.epochs, t.max_steps) == (None, None)  # plan.duration: fast 3 epochs, seed 60 steps
    s.train.recipe = "seed"
    assert batch_plan(s.train).as_dict() == {"per_device_batch_size": 2, "gradient_accumulation_steps": 4, "packing": False,
                                       "sampling": "random", "pad_to_multiple_of": None, "world_size": 1, "rows_per_step": 8,
                                       "learning_rate": 2e-4, "warmup_steps": 5, "cuda_graphs": False}
    assert (t.learning_rate, t.warmup_steps, t.lr_scheduler_type, t.optim) == (None, None, "linear", None)
    assert (t.weight_decay, t.seed, s.model.max_seq_length, s.model.load_in_4bit) == (0.01, 3407, 2048, True)
    assert s.data.max_reject_ratio == 0.0 and s.engine == "auto"


def test_nested_and_json_values(clean_env, monkeypatch):
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QLORA_LORA__R", "8")
    monkeypatch.setenv("qlora_train__max_steps", "7")  # env names are case-insensitive, as in pydantic-settings
    monkeypatch.setenv("QLORA_LORA__TARGET_MODULES", '["q_proj", "v_proj"]')
    monkeypatch.setenv("QLORA_VERIFY__PROMPTS", '[{"prompt": "hi", "expected": "hello"}]')
    s = load_settings()
    assert (s.lora.r, s.train.max_steps, s.lora.target_modules) == (8, 7, ["q_proj", "v_proj"])
    assert s.verify.prompts[0].expected == "hello"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"QLORA_OUTPUT_URI": "s3://m/r"}, ["QLORA_DATASET_URI", "required"]),
        ({**REQUIRED, "QLORA_TRAIN__MAX_STEP": "10"}, ["QLORA_TRAIN__MAX_STEP", "did you mean QLORA_TRAIN__MAX_STEPS"]),
        ({**REQUIRED, "QLORA_LORA__RANK": "8"}, ["QLORA_LORA__RANK", "QLORA_LORA__R"]),
        ({**REQUIRED, "QLORA_TRAIN__MAX_STEPS": "many"}, ["QLORA_TRAIN__MAX_STEPS", "'many'"]),
        ({**REQUIRED, "QLORA_TRAIN__LEARNING_RATE": "-1"}, ["QLORA_TRAIN__LEARNING_RATE", "greater than 0"]),
        ({**REQUIRED, "QLORA_ENGINE": "vllm"}, ["QLORA_ENGINE", "'vllm'"]),
        ({**REQUIRED, "QLORA_DATASET_URI": "gs://bucket/x.jsonl"}, ["QLORA_DATASET_URI", "unsupported scheme"]),
        ({**REQUIRED, "QLORA_OUTPUT_URI": "s3://Bad_Bucket/x"}, ["QLORA_OUTPUT_URI", "bucket"]),
        ({**REQUIRED, "QLORA_RUN_ID": "has spaces"}, ["QLORA_RUN_ID"]),
        ({**REQUIRED, "QLORA_LORA__TARGET_MODULES": "q_proj"}, ["QLORA_LORA__TARGET_MODULES"]),
        ({**REQUIRED, "QLORA_EVAL__STRATEGY": "steps"}, ["QLORA_EVAL", "strategy needs an evaluation set"]),
        ({**REQUIRED, "QLORA_EVAL__FRACTION": "0.1", "QLORA_EVAL__EARLY_STOPPING_PATIENCE": "3"},
         ["QLORA_EVAL", "needs evaluations during training: set QLORA_EVAL__STRATEGY"]),
        ({**REQUIRED, "QLORA_PROMOTION__METRIC": "bleu"}, ["QLORA_PROMOTION__METRIC", "'bleu'"]),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_the_variable(env, names, tmp_path):
    result = run_job(env={**env, "QLORA_WORK_DIR": str(tmp_path)})
    assert result.returncode == ExitCode.CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0]


def test_termination_log_gets_the_cause(tmp_path):
    log = tmp_path / "termination-log"
    result = run_job(env={"QLORA_OUTPUT_URI": "s3://m/r", "QLORA_TERMINATION_LOG": str(log)})
    assert result.returncode == 2
    assert log.read_text().strip() == result.stderr.strip().removeprefix("qlora-job: error: ")


def test_unknown_variable_error_in_process(clean_env, monkeypatch):
    monkeypatch.setenv("QLORA_DATA__MAX_REJECTS_RATIO", "0.1")
    with pytest.raises(ConfigError, match="did you mean QLORA_DATA__MAX_REJECT_RATIO"):
        load_settings()


def test_config_prints_resolved_settings_with_secret_redacted():
    result = run_job("config", env={**REQUIRED, "QLORA_HF_TOKEN": "hf_supersecretvalue", "QLORA_LORA__R": "32"})
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["lora"]["r"] == 32 and resolved["dataset_uri"] == REQUIRED["QLORA_DATASET_URI"]
    assert resolved["hf_token"] == "**********"
    assert "supersecret" not in result.stdout + result.stderr


def test_env_docs_cover_every_variable_with_type_default_and_description():
    result = run_job("config", "--env-docs", env={})
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows == {row["name"]: row for row in env_docs()}
    for fixed in ("QLORA_DATASET_URI", "QLORA_OUTPUT_URI", "QLORA_MODEL__NAME", "QLORA_RUN_ID", "QLORA_ENGINE",
                  "QLORA_TRAIN__MAX_STEPS", "QLORA_DATA__MAX_REJECT_RATIO"):
        assert fixed in rows
    assert rows["QLORA_DATASET_URI"]["default"] == "(required)"
    assert rows["QLORA_LORA__R"]["default"] == "16" and rows["QLORA_LORA__R"]["type"] == "int"
    assert all(row["description"] for row in rows.values())


def test_configuration_doc_lists_exactly_what_the_code_accepts():
    doc = (REPO / "docs" / "configuration.md").read_text()
    table = doc.split("<!-- env-docs:start -->\n")[1].split("<!-- env-docs:end -->")[0]
    generated = run_job("config", "--env-docs", "--markdown", env={}).stdout
    assert table == generated, "regenerate with: make docs"


@pytest.mark.parametrize(("value", "sources"), [
    ("s3://data/train.jsonl", [("s3://data/train.jsonl", 1.0)]),
    ("s3://data/shards/", [("s3://data/shards/", 1.0)]),
    ('["s3://data/a/", {"uri": "/mnt/b.jsonl.zst", "weight": 2.5}]', [("s3://data/a/", 1.0), ("/mnt/b.jsonl.zst", 2.5)]),
])
def test_a_dataset_is_one_uri_or_a_weighted_list(clean_env, monkeypatch, value, sources):
    from job.settings import dataset_sources

    monkeypatch.setenv("QLORA_DATASET_URI", value)
    monkeypatch.setenv("QLORA_OUTPUT_URI", "s3://models/runs")
    assert load_settings().dataset_uri == value and dataset_sources(value) == sources


@pytest.mark.parametrize(("value", "message"), [
    ('[{"uri": "s3://data/a.jsonl", "weight": -1}]', "weight of s3://data/a.jsonl must be a number above 0, got -1"),
    ('[{"uri": "s3://data/a.jsonl", "weight": true}]', "must be a number above 0, got true"),
    ('[{"uri": "s3://data/a.jsonl", "weight": "2"}]', 'must be a number above 0, got "2"'),
    ('[{"uri": "s3://data/a.jsonl", "share": 2}]', 'must be a URI or {"uri": "...", "weight": N}'),
    ("[]", "is an empty list"),
    ('["gs://data/a.jsonl"]', "unsupported scheme 'gs://'"),
])
def test_a_bad_dataset_list_is_a_config_error(clean_env, monkeypatch, value, message):
    monkeypatch.setenv("QLORA_DATASET_URI", value)
    monkeypatch.setenv("QLORA_OUTPUT_URI", "s3://models/runs")
    with pytest.raises(ConfigError, match="QLORA_DATASET_URI") as error:
        load_settings()
    assert message in str(error.value)
