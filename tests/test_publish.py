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
        outcomes[name] = publish.publish_run(out, run_uri, {"run_id": "race", "pod": name}) is not None

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
