"""Servability (job/servable.py): each engine's loader rule on adapters that break it, a real adapter of the tiny
Qwen3-shaped (tied) model with and without trainable tokens, and a run that must be servable and is not."""

import json

import pytest

from job.errors import ExitCode, NotServable
from job.servable import check_adapter, problems_by_engine, require, vllm_flags
from tests.conftest import run_job
from tests.test_e2e import s3_run  # noqa: F401  (the fixture)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = [f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB"]
QWEN3 = {"model_type": "qwen3", "tie_word_embeddings": True}
LLAMA = {"model_type": "llama", "tie_word_embeddings": False}


def servable(config: dict, names: list[str] = LORA, base: dict = QWEN3) -> dict[str, bool]:
    return {engine: not problems for engine, problems in problems_by_engine({"r": 16, "target_modules": SEVEN, **config}, names, base).items()}


def test_the_jobs_default_adapter_loads_everywhere():
    assert servable({}) == {"vllm": True, "sglang": True, "llama_cpp": True}
    assert servable({"target_modules": "all-linear"}) == {"vllm": True, "sglang": False, "llama_cpp": True}


@pytest.mark.parametrize(("config", "names", "base", "expected", "reason"), [
    ({"modules_to_save": ["lm_head"]}, LORA, QWEN3, (False, False, False), "modules_to_save"),
    ({"use_dora": True}, LORA, QWEN3, (False, False, False), "DoRA"),
    ({"r": 1024}, LORA, QWEN3, (False, True, True), "rank 1024 is above vLLM's largest --max-lora-rank (512)"),
    ({"bias": "all"}, LORA, QWEN3, (False, True, True), "bias 'all'"),
    ({"target_modules": [*SEVEN, "lm_head"]}, LORA, QWEN3, (False, False, False), "vllm#33234"),
    ({"target_modules": [*SEVEN, "embed_tokens", "lm_head"]}, LORA, LLAMA, (True, False, True), "SGLang takes q/k/v/o/gate/up/down only"),
    ({"trainable_token_indices": {"embed_tokens": [5, 6]}},
     [*LORA, "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"], QWEN3, (False, False, False),
     "trainable token rows"),
    ({}, [*LORA, "base_model.model.model.embed_tokens.weight"], QWEN3, (False, True, False), "is not a LoRA weight"),
])
def test_each_engine_rule_refuses_the_adapter_that_breaks_it(config, names, base, expected, reason):
    problems = problems_by_engine({"r": 16, "target_modules": SEVEN, **config}, names, base)
    assert tuple(not problems[e] for e in ("vllm", "sglang", "llama_cpp")) == expected
    assert any(reason in p for ps in problems.values() for p in ps), problems


def test_vllm_needs_max_lora_rank_above_16():
    assert (vllm_flags({"r": 16}), vllm_flags({"r": 64}), vllm_flags({"r": 300})) == ("", "--max-lora-rank 64", "--max-lora-rank 320")


def test_require_names_the_engine_and_why():
    report = {"vllm": {"servable": False, "reason": "DoRA (use_dora)"}, "sglang": {"servable": True, "reason": "loads as published"},
              "llama_cpp": {"servable": True, "reason": "loads as published"}}
    require(report, ["sglang", "llama_cpp"])
    with pytest.raises(NotServable, match=r"would not load in vllm: DoRA \(use_dora\)") as raised:
        require(report, ["vllm"])
    assert raised.value.exit_code == ExitCode.NOT_SERVABLE == 8


def test_a_tied_qwen3_shaped_adapter_with_and_without_trainable_tokens(clean_env, tmp_path, tiny_model):
    """The tiny model has Qwen3's shape and ties its embeddings, as Qwen3-0.6B does: its plain adapter loads in all
    three engines; with trainable tokens (peft's trainable_token_indices) in none, and the report says why."""
    from job import engine
    from job.settings import Settings

    base = json.loads((tiny_model / "config.json").read_text())
    assert base["tie_word_embeddings"] and base["model_type"] == "qwen3"
    for tokens, expected in (([], True), (["<|im_start|>", "<|im_end|>"], False)):
        settings = Settings(dataset_uri=str(tmp_path / "d.jsonl"), output_uri=str(tmp_path / "out"), lora={"trainable_tokens": tokens})
        model, _ = engine.load_for_training(settings, "transformers", str(tiny_model))
        folder = tmp_path / f"adapter-{len(tokens)}"
        model.save_pretrained(str(folder), safe_serialization=True)
        report = check_adapter(folder, base)
        assert {e: v["servable"] for e, v in report.items()} == dict.fromkeys(("vllm", "sglang", "llama_cpp"), expected), report
        if tokens:
            assert all("trainable token rows" in v["reason"] for v in report.values())


@pytest.mark.slow
def test_a_run_that_must_serve_on_vllm_with_trainable_tokens_exits_8_and_publishes_nothing(s3, bucket, s3_run):  # noqa: F811
    env = {**s3_run, "QLORA_RUN_ID": "tokens", "QLORA_LORA__TRAINABLE_TOKENS": '["<|im_start|>", "<|im_end|>"]',
           "QLORA_VERIFY__REQUIRE_SERVABLE": '["llama_cpp", "vllm"]'}
    result = run_job(env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == ExitCode.NOT_SERVABLE, result.stderr[-3000:]
    assert len(lines) == 1 and "would not load in llama_cpp: trainable token rows" in lines[0] and "; vllm: " in lines[0], lines
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/tokens/").get("Contents")
