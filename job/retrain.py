"""Periodic retraining: skip a run that would repeat the last published one, keep a
`latest.json` pointer to the newest verified run, and keep only the newest N runs.

latest.json lives at <output_uri>/latest.json and is moved only after a run's manifest is
written (so it never points at a run that failed verify or is half-uploaded)."""

import hashlib
import json

from job import storage
from job.errors import ConfigError, StorageError, one_line
from job.logs import get_logger
from job.publish import MANIFEST, check_manifest
from job.settings import Settings, redacted, valid_run_id

log = get_logger(__name__)
LATEST = "latest.json"
# Settings that do not change what a run trains: where it runs, how it logs, what it keeps.
NOT_TRAINING = {"run_id", "work_dir", "termination_log", "log_format", "log_level", "hf_token", "retrain", "metrics",
               "promotion", "plan"}


def settings_sha256(settings: Settings) -> str:
    """Fingerprint of every setting that changes the trained adapter (the model cache folder excluded)."""
    values = {k: v for k, v in redacted(settings).items() if k not in NOT_TRAINING}
    values["model"] = {k: v for k, v in values["model"].items() if k != "cache_dir"}
    values["eval"] = {k: v for k, v in values["eval"].items() if not k.startswith("answer_")}  # scoring, not training
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def read_latest(output_uri: str) -> dict | None:
    """latest.json's pointer, or None when there is none. One this job did not write (not JSON, a run id that
    is not one, fields of the wrong type) is logged and treated as absent: the next promoted run replaces it."""
    uri = storage.join(output_uri, LATEST)
    body = storage.read_bytes(uri)
    if not body:
        return None
    try:
        latest = json.loads(body)
        if not isinstance(latest, dict):
            raise ValueError("not a JSON object")
        if not valid_run_id(latest.get("run_id")):
            raise ValueError(f"run_id {str(latest.get('run_id'))[:80]!r} is not a run id")
        if not isinstance(latest.get("published_at", ""), str) or not isinstance(latest.get("base_model"), dict):
            raise ValueError("'published_at' or 'base_model' has the wrong type")
    except (ValueError, RecursionError) as why:
        log.warning("latest.json is not a pointer this job wrote; treating this as the first run", uri=uri, error=one_line(why, 200))
        return None
    return latest


def identity(dataset_sha256: str, settings: Settings, model_fingerprint: str | None) -> dict:
    """What a retrain compares: the data, the settings, the base model (name, revision, and the
    fingerprint of its content where it has one: engine.base_model_fingerprint)."""
    return {"dataset_sha256": dataset_sha256, "settings_sha256": settings_sha256(settings),
            "base_model": {"name": settings.model.name, "revision": settings.model.revision, "fingerprint": model_fingerprint}}


def unchanged_since(latest: dict | None, current: dict) -> bool:
    return latest is not None and all(latest.get(key) == value for key, value in current.items())


def skip_unchanged(settings: Settings, current: dict) -> bool:
    """True (and logged) when skipping is on and latest.json's run had this run's identity."""
    latest = read_latest(settings.output_uri)
    if not (settings.retrain.skip_unchanged and unchanged_since(latest, current)):
        return False
    log.info("unchanged since the latest published run; skipping", latest_run=latest["run_id"],
             dataset_sha256=current["dataset_sha256"], settings_sha256=current["settings_sha256"])
    return True


def already_published(output_uri: str, manifest: dict, current: dict) -> None:
    """This run_id has a manifest. A retried pod of that run (same identity) logs it and moves latest.json
    again, for a pod that published but failed to move it; a run_id reused with another dataset, settings
    or base model is refused: it would train nothing and succeed."""
    published = {"dataset_sha256": manifest["dataset"]["sha256"], "settings_sha256": manifest.get("settings_sha256"),
                 "base_model": manifest["base_model"]}
    for key, what in (("dataset_sha256", "dataset"), ("settings_sha256", "settings"), ("base_model", "base model")):
        if published[key] != current[key]:
            raise ConfigError(f"run {manifest['run_id']!r} is already published with another {what} "
                              f"({_short(published[key])}; this run: {_short(current[key])}): set a new QLORA_RUN_ID")
    log.info("run already published; nothing to do", published_at=manifest.get("published_at"))
    move_latest(output_uri, manifest)


def _short(value) -> str:
    if isinstance(value, dict):  # the base model
        return f"{value.get('name')} {(value.get('fingerprint') or value.get('revision') or '')[:12]}".strip()
    return f"sha256 {str(value)[:12]}"


def move_latest(output_uri: str, manifest: dict) -> str | None:
    """Point latest.json at a published run, described by its manifest, unless it already points at
    a newer one. Called after the manifest is written, and again by a retried pod that finds the
    manifest (so a failed move heals on retry). Returns the run id latest.json points to afterwards."""
    latest = read_latest(output_uri)
    if not (manifest.get("promotion") or {}).get("promoted", True):
        return (latest or {}).get("run_id")  # published, but worse than the champion on held-out answers (job/evaluate.py)
    if latest and (latest.get("run_id") == manifest["run_id"] or (latest.get("published_at") or "") > manifest["published_at"]):
        return latest.get("run_id")
    body = {"run_id": manifest["run_id"], "manifest": storage.join(output_uri, manifest["run_id"], MANIFEST),
            "published_at": manifest["published_at"], "dataset_sha256": manifest["dataset"]["sha256"],
            "settings_sha256": manifest.get("settings_sha256"),
            "base_model": manifest["base_model"]}
    storage.put_bytes(json.dumps(body, indent=2).encode(), storage.join(output_uri, LATEST))
    log.info("latest.json moved", run_id=manifest["run_id"])
    return manifest["run_id"]


def apply_retention(output_uri: str, keep: int, protect: set[str]) -> list[str]:
    """Delete published runs beyond the newest `keep` (by published_at), never those in `protect`.
    Runs without a manifest (running, or failed) are left alone. Returns the deleted run ids."""
    if keep <= 0:
        return []
    try:
        return _delete_old_runs(output_uri, keep, protect)
    except StorageError as error:  # the run is published; old runs stay until a later run can delete them
        log.warning("could not delete old runs (s3:DeleteObject on the output prefix?)", error=str(error))
        return []


def _delete_old_runs(output_uri: str, keep: int, protect: set[str]) -> list[str]:
    published = []
    for key in storage.list_keys(output_uri):
        run_id, _, rest = key.partition("/")
        if rest == MANIFEST and valid_run_id(run_id):
            try:
                manifest = check_manifest(json.loads(storage.read_bytes(storage.join(output_uri, key)) or b"{}"))
            except (ValueError, RecursionError) as why:  # not this job's: neither counted nor deleted
                log.warning("not a manifest this job can read; that run is left alone", key=key, error=one_line(why, 200))
                continue
            published.append((manifest["published_at"], run_id))
    deleted = []
    for _, run_id in sorted(published, reverse=True)[keep:]:
        if run_id in protect:
            continue
        # Manifest first: a run caught half-deleted must not look complete.
        storage.delete_keys(storage.join(output_uri, run_id), [MANIFEST])
        storage.delete_prefix(storage.join(output_uri, run_id))
        deleted.append(run_id)
    if deleted:
        log.info("old runs deleted", keep=keep, deleted=deleted)
    return deleted
