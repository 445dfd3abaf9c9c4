"""metrics.json (job/observe.py): one typed value, written once when the run's stages end."""

import json

import pytest

from job.data import DataReport
from job.observe import metrics_file
from job.train import TrainMetrics

TRAINED = TrainMetrics(
    engine="transformers", steps=3, resumed_from=None, rows=8, mean_row_tokens=40.0, loss_first=3.0, loss_last=1.0,
    loss_curve=[{"step": 1, "tokens": 10, "loss": 3.0, "lr": 2e-4}], eval_rows=0, eval_loss_before=None, eval_loss_after=None,
    train_tokens=30, train_seconds=1.5, tokens_per_second=20.0, steady_tokens_per_second=None, tokens_per_step=10,
    step_seconds=[0.5, 0.5, 0.5], batch_plan={"rows_per_step": 8}, peak_gpu_memory_gib=None, world_size=1, cpu_threads=2,
    label_check={"masked": 5, "trained": 4, "end_of_turn_trained": 1}, model_load_s=0.2)


def test_metrics_are_written_once_with_training_timings_and_data_at_the_top_level(tmp_path):
    path = tmp_path / "publish" / "metrics.json"
    with metrics_file(path, "run-1") as metrics:
        metrics.timings["fetch_s"] = 0.1
        metrics.data = DataReport(source="d.jsonl", sha256="d" * 64, accepted=8, truncated=1)
        metrics.train = TRAINED
        assert not path.exists()  # nothing half-known is written while stages run
    written = json.loads(path.read_text())
    assert written["steps"] == 3 and written["engine"] == "transformers" and written["run_id"] == "run-1"
    assert written["timings"] == {"fetch_s": 0.1} and written["overlength_truncated"] == 1
    assert written["data"]["accepted"] == 8 and written["label_check"]["end_of_turn_trained"] == 1


def test_a_gate_that_fails_after_training_still_leaves_the_numbers(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), metrics_file(path, "run-2") as metrics:
        metrics.train = TRAINED
        raise RuntimeError("verify failed")
    assert json.loads(path.read_text())["loss_last"] == 1.0


def test_a_run_that_never_trained_writes_no_metrics(tmp_path):
    with metrics_file(tmp_path / "metrics.json", "run-3"):
        pass
    assert not (tmp_path / "metrics.json").exists()
