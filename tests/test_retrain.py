"""Retrain identity (job/retrain.py): what makes two runs the same run, without S3 or a model."""

from job.retrain import identity, settings_sha256, unchanged_since
from job.settings import Settings

REQUIRED = {"dataset_uri": "s3://data/train.jsonl", "output_uri": "s3://models/runs"}


def test_settings_that_do_not_change_the_adapter_do_not_change_its_identity(clean_env, tmp_path):
    base = settings_sha256(Settings(**REQUIRED))
    where_and_how_it_logs = Settings(**REQUIRED, run_id="other", work_dir=tmp_path, log_level="debug", hf_token="secret",
                                     retrain={"keep_runs": 3}, metrics={"loss_curve_png": False},
                                     model={"cache_dir": tmp_path / "cache"})
    assert settings_sha256(where_and_how_it_logs) == base
    for changed in ({"train": {"learning_rate": 1e-4}}, {"lora": {"r": 8}}, {"model": {"max_seq_length": 1024}},
                    {"data": {"system_prompt": "Be brief."}}, {"train": {"recipe": "seed"}}):
        assert settings_sha256(Settings(**REQUIRED, **changed)) != base, changed


def test_a_run_is_unchanged_only_when_data_settings_and_base_model_all_match(clean_env):
    settings = Settings(**REQUIRED)
    current = identity("d" * 64, settings, "fingerprint-1")
    assert current["base_model"] == {"name": "Qwen/Qwen3-0.6B", "revision": None, "fingerprint": "fingerprint-1"}
    latest = {"run_id": "r1", "published_at": "2026-12-01T00:00:00+00:00", **current}
    assert unchanged_since(latest, current)
    assert not unchanged_since(None, current)  # the first run
    assert not unchanged_since(latest, identity("e" * 64, settings, "fingerprint-1"))  # new data
    assert not unchanged_since(latest, identity("d" * 64, settings, "fingerprint-2"))  # weights replaced in place
    assert not unchanged_since(latest, identity("d" * 64, Settings(**REQUIRED, lora={"r": 8}), "fingerprint-1"))
    # A latest.json written before fingerprints existed compares unequal: one retrain, never a wrong skip.
    assert not unchanged_since({**latest, "base_model": {"name": "Qwen/Qwen3-0.6B", "revision": None}}, current)
