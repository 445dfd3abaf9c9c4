"""Publishing: objects first, manifest.json last and only if absent, so a run without a
manifest is incomplete and two racing pods never both publish."""

import datetime
import json
from importlib import metadata
from pathlib import Path

from job import storage
from job.errors import ConfigError, JobError, one_line
from job.logs import get_logger
from job.settings import Settings, redacted, valid_run_id

log = get_logger(__name__)
MANIFEST = "manifest.json"
PACKAGES = ("qlora-job", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
            "unsloth", "unsloth_zoo", "xformers", "boto3")


def find_manifest(run_uri: str, error: type[JobError] = ConfigError) -> dict | None:
    """The run's manifest if it was published, else None. One that is not a manifest this job wrote raises
    `error` (the exit code of what is being read), naming the first field that is wrong."""
    uri = storage.join(run_uri, MANIFEST)
    data = storage.read_bytes(uri)
    return None if data is None else parse_manifest(data, uri, error)


def parse_manifest(data: bytes, uri: str, error: type[JobError] = ConfigError) -> dict:
    try:
        return check_manifest(json.loads(data))
    except (ValueError, RecursionError) as why:
        raise error(f"{uri}: not a manifest this job can read: {one_line(why, 200)}") from None


def check_manifest(document: object) -> dict:
    """The document, if it has every field later stages read from a manifest with the right type; else
    ValueError naming the first that does not (a bucket's content is input, not trusted state)."""
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    for field, kind in (("run_id", str), ("published_at", str), ("dataset", dict), ("base_model", dict), ("objects", list)):
        if not isinstance(document.get(field), kind):
            raise ValueError(f"{field!r} is missing or not a {kind.__name__}")
    if not valid_run_id(document["run_id"]):
        raise ValueError(f"run_id {document['run_id'][:80]!r} is not a run id")
    if not isinstance(document["dataset"].get("sha256"), str) or not isinstance(document.get("promotion", {}), dict):
        raise ValueError("'dataset.sha256' or 'promotion' has the wrong type")
    for i, obj in enumerate(document["objects"]):
        if not (isinstance(obj, dict) and isinstance(obj.get("key"), str) and isinstance(obj.get("sha256"), str)
                and type(obj.get("size")) is int):
            raise ValueError(f"objects[{i}] is not {{key, size, sha256}}")
    return document


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(run_id: str, settings: Settings, report, identity: dict, metrics: dict) -> dict:
    """What manifest.json says of a run besides its objects: data, base model, engine, settings (secrets
    redacted), losses. `report` is the DataReport, `identity` retrain.identity's, `metrics` metrics.json's."""
    return {
        "run_id": run_id,
        "dataset": {"uri": settings.dataset_uri, "sha256": report.sha256, "rows_accepted": report.accepted,
                    "rows_rejected": report.rejected, "shards": report.shards},
        "base_model": identity["base_model"],
        "parent": metrics.get("parent"),  # the adapter a warm start continued from (QLORA_LORA__INIT_FROM), else None
        "engine": metrics["engine"],
        "settings": redacted(settings),
        "settings_sha256": identity["settings_sha256"],
        "duration": {**metrics.get("duration", {}), "steps_trained": metrics["steps"], "epochs_trained": metrics.get("epochs_trained")},
        "loss": {"first": metrics["loss_first"], "last": metrics["loss_last"],
                 "eval_before": metrics["eval_loss_before"], "eval_after": metrics["eval_loss_after"],
                 "best": metrics.get("best"), "stopped_early": metrics.get("stopped_early", False)},
        # held-out answer metrics (job/evaluate.py) and whether latest.json moved to this run, and why
        "evaluation": {k: v for k, v in (metrics.get("evaluation") or {}).items() if k != "promotion"},
        "promotion": (metrics.get("evaluation") or {}).get("promotion") or {"promoted": True, "reason": "not evaluated"},
        # whether vLLM, SGLang and llama.cpp load the adapter as published, and why not (job/servable.py)
        "servable": metrics.get("servable"),
    }


def publish_run(run_dir: Path, run_uri: str, manifest: dict) -> dict | None:
    """Upload every file under run_dir, then manifest.json listing them (size, sha256) after the given
    fields. Returns the manifest written, or None when another writer's manifest for this run_id was there first."""
    objects = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        key = path.relative_to(run_dir).as_posix()
        storage.put_file(path, storage.join(run_uri, key))
        objects.append({"key": key, "size": path.stat().st_size, "sha256": storage.sha256_file(path)})
        log.info("uploaded", key=key, size=objects[-1]["size"])
    document = {
        **manifest,
        "objects": objects,
        "packages": package_versions(),
        "published_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    body = json.dumps(document, ensure_ascii=False, indent=2).encode()
    return document if storage.put_if_absent(body, storage.join(run_uri, MANIFEST)) else None
