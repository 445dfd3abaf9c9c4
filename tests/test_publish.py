import json
import threading

from job import publish


def test_two_pods_racing_on_one_run_id_never_both_publish(s3, bucket, tmp_path):
    run_uri = f"s3://{bucket}/runs/race"
    outcomes = {}

    def pod(name: str):
        out = tmp_path / name
        (out / "adapter").mkdir(parents=True)
        (out / "adapter" / "adapter_model.safetensors").write_bytes(name.encode() * 1000)
        (out / "metrics.json").write_text(json.dumps({"pod": name}))
        outcomes[name] = publish.publish_run(out, run_uri, {"run_id": "race", "pod": name, "dataset": {"sha256": "d" * 64},
                                                                 "base_model": {"name": "m"}}) is not None

    threads = [threading.Thread(target=pod, args=(f"pod-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == [False, False, False, True]
    winner = next(name for name, won in outcomes.items() if won)
    manifest = publish.find_manifest(run_uri)
    assert manifest["pod"] == winner and {o["key"] for o in manifest["objects"]} == {"adapter/adapter_model.safetensors", "metrics.json"}
    assert publish.find_manifest(f"s3://{bucket}/runs/other") is None


def test_the_manifest_names_data_model_engine_settings_and_losses_without_secrets(clean_env):
    from job.data import DataReport
    from job.retrain import identity
    from job.settings import Settings

    settings = Settings(dataset_uri="s3://data/train.jsonl", output_uri="s3://models/runs", hf_token="hf_not_for_manifests")
    report = DataReport(source="/work/dataset.jsonl", sha256="d" * 64, accepted=98, rejected=2)
    run_identity = identity(report.sha256, settings, "fp")
    metrics = {"engine": "transformers", "loss_first": 3.2, "loss_last": 0.4, "eval_loss_before": None, "eval_loss_after": None,
               "steps": 21, "epochs_trained": 3.0, "best": {"step": 14, "eval_loss": 0.5}, "stopped_early": True,
               "duration": {"epochs": 3.0, "max_steps": None, "steps_per_epoch": 7, "steps": 21, "planned_epochs": 3.0},
               "evaluation": {"prompts": 2, "tuned": {"chrf": 80.0, "exact_match": 50.0}, "promotion": {"promoted": False, "reason": "r"}}}
    manifest = publish.build_manifest("run-7", settings, report, run_identity, metrics)
    assert manifest["duration"] == {"epochs": 3.0, "max_steps": None, "steps_per_epoch": 7, "steps": 21, "planned_epochs": 3.0,
                                    "steps_trained": 21, "epochs_trained": 3.0}
    assert manifest["dataset"] == {"uri": "s3://data/train.jsonl", "sha256": "d" * 64, "rows_accepted": 98, "rows_rejected": 2,
                                   "shards": []}
    assert manifest["base_model"] == run_identity["base_model"] and manifest["settings_sha256"] == run_identity["settings_sha256"]
    assert (manifest["run_id"], manifest["engine"]) == ("run-7", "transformers")
    assert manifest["loss"] == {"first": 3.2, "last": 0.4, "eval_before": None, "eval_after": None,
                                "best": {"step": 14, "eval_loss": 0.5}, "stopped_early": True}
    assert manifest["evaluation"] == {"prompts": 2, "tuned": {"chrf": 80.0, "exact_match": 50.0}}
    assert manifest["promotion"] == {"promoted": False, "reason": "r"}
    assert manifest["settings"]["hf_token"] == "**********" and "hf_not_for_manifests" not in json.dumps(manifest)


def test_the_champion_is_latest_jsons_adapter_on_the_same_base_model_checked_by_its_manifest(tmp_path, clean_env):
    import hashlib

    from job.evaluate import fetch_champion
    from job.settings import Settings

    out = tmp_path / "runs"
    settings = Settings(dataset_uri=str(tmp_path / "d.jsonl"), output_uri=str(out))
    base = {"name": "Qwen/Qwen3-0.6B", "revision": None, "fingerprint": "abc"}
    assert fetch_champion(settings, base, "new", tmp_path / "c0") == (None, "no champion: nothing is published under the output prefix yet")

    (out / "old" / "adapter").mkdir(parents=True)
    weights = b"not really safetensors"
    (out / "old" / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    manifest = {"run_id": "old", "published_at": "2026-12-01T00:00:00+00:00", "dataset": {"sha256": "d" * 64}, "base_model": base,
                "objects": [{"key": "adapter/adapter_model.safetensors", "size": len(weights),
                                              "sha256": hashlib.sha256(weights).hexdigest()}]}
    (out / "old" / "manifest.json").write_text(json.dumps(manifest))
    (out / "latest.json").write_text(json.dumps({"run_id": "old", "base_model": {**base, "fingerprint": "other"}}))
    champion, why = fetch_champion(settings, base, "new", tmp_path / "c1")
    assert champion is None and why == "no champion: latest.json's run old was trained on another base model"

    (out / "latest.json").write_text(json.dumps({"run_id": "old", "base_model": base}))
    champion, why = fetch_champion(settings, base, "new", tmp_path / "c2")
    assert (champion["run_id"], why) == ("old", "")
    assert (champion["folder"] / "adapter_model.safetensors").read_bytes() == weights
    assert fetch_champion(Settings(dataset_uri=str(tmp_path / "d.jsonl"), output_uri=str(out), promotion={"compare": False}),
                          base, "new", tmp_path / "c3")[0] is None

    (out / "old" / "adapter" / "adapter_model.safetensors").write_bytes(b"replaced in place")  # not what the manifest says
    champion, why = fetch_champion(settings, base, "new", tmp_path / "c4")
    assert champion is None and "does not match its manifest's sha256" in why


def test_answers_are_scored_by_exact_match_up_to_normalisation_and_by_chrf():
    import unicodedata

    from job.evaluate import score

    korean = "서울은 한국의 수도입니다."
    nfd = unicodedata.normalize("NFD", korean)  # as files written on macOS often hold it
    assert score([korean, "Paris  is the capital."], [nfd, "Paris is the capital."]) == {"exact_match": 100.0, "chrf": 100.0}
    partial = score(["서울은 한국의 도시입니다.", "Lyon."], [korean, "Paris is the capital."])
    assert partial["exact_match"] == 0.0 and 0 < partial["chrf"] < 100
