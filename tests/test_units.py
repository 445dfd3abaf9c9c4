"""The pure parts of evaluate (scores, promotion), checkpoint (what validates, the best adapter's record) and
warmstart (does a parent fit this run): built from settings sections and files, no S3, no model, no environment."""

import json
import math
import signal

import pytest

from job import checkpoint, evaluate, warmstart
from job.errors import ConfigError, ModelLoadError
from job.settings import LoraSettings, PromotionSettings


# --- evaluate ---
def test_scores_are_exact_match_and_chrf_on_normalised_text():
    import unicodedata

    references = ["Integrated sensing and communication.", "재구성 가능한 지능형 표면"]
    same = evaluate.score(references, references)
    assert same == {"exact_match": 100.0, "chrf": 100.0}
    # Whitespace runs and NFD Hangul are the same answer (NFD scored jamo by jamo gave 41 chrF).
    spaced = ["Integrated  sensing and\ncommunication.", unicodedata.normalize("NFD", references[1])]
    assert evaluate.score(spaced, references) == same
    half = evaluate.score(["Integrated sensing and communication.", "전혀 다른 답"], references)
    assert half["exact_match"] == 50.0 and 0 < half["chrf"] < 100


@pytest.mark.parametrize(("ours", "theirs", "tolerance", "promoted"), [
    (80.0, 80.5, 1.0, True),  # within the tolerance
    (80.0, 81.0, 1.0, True),  # exactly at it
    (80.0, 81.01, 1.0, False),
    (80.0, 80.5, 0.0, False),
    (90.0, 80.0, 0.0, True),
])
def test_promotion_follows_the_metric_and_tolerance(ours, theirs, tolerance, promoted):
    rules = PromotionSettings(metric="chrf", tolerance=tolerance)
    scores = {"tuned": {"chrf": ours, "exact_match": 0.0}, "champion": {"chrf": theirs, "exact_match": 100.0}}
    decision = evaluate.promotion(rules, scores, {"run_id": "r-old"}, "")
    assert decision["promoted"] is promoted and (decision["challenger"], decision["champion"]) == (ours, theirs)
    assert decision["champion_run_id"] == "r-old" and f"{ours:.2f}" in decision["reason"]


def test_promotion_by_exact_match_and_without_a_champion():
    scores = {"tuned": {"chrf": 10.0, "exact_match": 90.0}, "champion": {"chrf": 99.0, "exact_match": 50.0}}
    assert evaluate.promotion(PromotionSettings(metric="exact_match", tolerance=0), scores, {"run_id": "r"}, "")["promoted"]
    first = evaluate.promotion(PromotionSettings(), {"tuned": {"chrf": 1.0}}, None, "no champion: nothing is published")
    assert first == {"promoted": True, "reason": "no champion: nothing is published", "metric": "chrf"}


def test_gauges_name_each_score_by_whose_answers_they_are():
    report = {"tuned": {"chrf": 90.0}, "base": {"chrf": 40.0, "exact_match": 0.0}, "champion": None,
              "promotion": {"promoted": False}}
    assert evaluate.gauges(report) == {"answer_chrf": 90.0, "base_answer_chrf": 40.0, "base_answer_exact_match": 0.0, "promoted": 0}


# --- checkpoint ---
def _checkpoint(folder, step=7, state=None):
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps(state if state is not None else {"global_step": step}))
    return folder


@pytest.mark.parametrize(("broken", "valid"), [
    (None, True),
    ("state-not-json", False), ("state-a-list", False), ("step-zero", False), ("step-a-string", False),
    ("weights-truncated", False), ("config-missing", False),
])
def test_a_checkpoint_validates_only_when_whole(tmp_path, broken, valid):
    folder = _checkpoint(tmp_path / "checkpoint-7")
    if broken == "state-not-json":
        (folder / "trainer_state.json").write_text("{")
    elif broken == "state-a-list":
        (folder / "trainer_state.json").write_text("[]")
    elif broken == "step-zero":
        (folder / "trainer_state.json").write_text('{"global_step": 0}')
    elif broken == "step-a-string":
        (folder / "trainer_state.json").write_text('{"global_step": "7"}')
    elif broken == "weights-truncated":
        (folder / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes()[:20])
    elif broken == "config-missing":
        (folder / "adapter_config.json").unlink()
    assert checkpoint.valid_checkpoint(folder) is valid
    assert checkpoint.NAME.match(folder.name).group(1) == "7" and not checkpoint.NAME.match("checkpoint-7x")


@pytest.mark.parametrize(("record", "kept"), [
    ({"step": 40, "eval_loss": 0.5}, True), ({"step": 40, "eval_loss": 1}, True),
    ({"step": "40", "eval_loss": 0.5}, False), ({"step": 40}, False), ([40, 0.5], False), ("{", False),
])
def test_the_best_adapter_record_is_read_only_as_this_job_writes_it(tmp_path, record, kept):
    (tmp_path / checkpoint.BEST_INFO).write_text(record if isinstance(record, str) else json.dumps(record))
    assert (checkpoint.read_best(tmp_path) == record) if kept else checkpoint.read_best(tmp_path) is None
    assert checkpoint.read_best(tmp_path / "absent") is None


class _Model:
    def __init__(self):
        self.saved = []

    def save_pretrained(self, folder, safe_serialization=True):
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.saved.append(folder)


class _State:
    def __init__(self, step):
        self.global_step, self.is_world_process_zero = step, True


def test_the_best_adapter_is_the_lowest_eval_loss_during_training(tmp_path):
    folder, model = tmp_path / "best-adapter", _Model()
    best = checkpoint.best_adapter_callback(folder, None)
    for step, loss in ((0, 0.1), (10, 2.0), (20, math.nan), (30, 1.5), (40, 1.7), (50, 1.5)):
        best.on_evaluate(None, _State(step), None, metrics={"eval_loss": loss}, model=model)
    # step 0 is the base line, NaN is no candidate, a tie is no improvement
    assert best.best == {"step": 30, "eval_loss": 1.5} and len(model.saved) == 2
    assert json.loads((folder / checkpoint.BEST_INFO).read_text()) == {"step": 30, "eval_loss": 1.5}


def test_a_resumed_run_starts_from_the_best_its_checkpoint_carries(tmp_path):
    resumed = _checkpoint(tmp_path / "checkpoint-105", step=105)
    (resumed / "best-adapter.safetensors").write_bytes((resumed / "adapter_model.safetensors").read_bytes())
    (resumed / "best-adapter.json").write_text(json.dumps({"step": 80, "eval_loss": 0.9}))
    best = checkpoint.best_adapter_callback(tmp_path / "best-adapter", resumed)
    assert best.best == {"step": 80, "eval_loss": 0.9} and (tmp_path / "best-adapter" / checkpoint.WEIGHTS).exists()
    (resumed / "best-adapter.json").write_text("[1]")  # not a record this job wrote: no candidate, weights dropped
    assert checkpoint.best_adapter_callback(tmp_path / "best-adapter", resumed).best is None
    assert not (tmp_path / "best-adapter").exists()


def test_a_stop_request_records_the_signal_that_stops_the_run():
    stop = checkpoint.StopRequest()
    assert stop.signal is None
    stop(signal.SIGTERM, None)
    stop(signal.SIGINT, None)
    assert stop.signal == signal.SIGINT  # the latest is kept; either stops at the step's end
    assert checkpoint.checkpoints_uri("s3://b/out/r1") == "s3://b/out/r1/checkpoints"


# --- warmstart ---
def test_a_parent_adapter_must_have_this_runs_lora_shape():
    lora = LoraSettings()
    config = {"r": 16, "lora_alpha": 16, "target_modules": list(reversed(lora.target_modules))}
    warmstart.check_shape(config, lora, "s3://b/parent/adapter")  # the order of modules does not matter
    with pytest.raises(ConfigError, match=r"another LoRA shape \(r 8 there, 16 here\)"):
        warmstart.check_shape({**config, "r": 8}, lora, "s3://b/parent/adapter")
    with pytest.raises(ConfigError, match="target_modules"):
        warmstart.check_shape({**config, "target_modules": ["q_proj"]}, lora, "s3://b/parent/adapter")
    with pytest.raises(ConfigError, match="alpha 32 there, 8 here"):
        warmstart.check_shape({**config, "lora_alpha": 32}, LoraSettings(alpha=8), "s3://b/parent/adapter")


def test_a_parent_must_come_from_this_runs_base_model():
    ours = {"name": "Qwen/Qwen3-0.6B", "revision": "c1899de", "fingerprint": "a" * 64}
    warmstart.check_base(dict(ours), ours, "s3://b/p/adapter")
    for key, value in (("name", "Qwen/Qwen3-1.7B"), ("revision", "main"), ("fingerprint", "b" * 64)):
        with pytest.raises(ConfigError, match="was trained on base model"):
            warmstart.check_base({**ours, key: value}, ours, "s3://b/p/adapter")


@pytest.mark.parametrize(("text", "message"), [("{", "is not JSON"), ("[]", "is not a JSON object"), ("1" * 5, "is not a JSON object")])
def test_a_parent_adapter_config_that_is_not_an_object_is_a_model_load_error(tmp_path, text, message):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        warmstart._adapter_config(tmp_path, "s3://b/p/adapter")
