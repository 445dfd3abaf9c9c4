"""Warm start (QLORA_LORA__INIT_FROM): train on from a published adapter instead of fresh LoRA weights.

`latest` is the adapter of the run latest.json points to under the output prefix (none yet: fresh
weights, so a CronJob's first run needs no special case); an s3:// or local prefix names an adapter
folder. The parent must have this run's LoRA shape, and, where its manifest says which base model
it was trained on, this run's base model: otherwise exit 2 before any model is loaded."""

import hashlib
import json
from pathlib import Path

from job import publish, retrain, storage
from job.errors import ConfigError, ModelLoadError, one_line
from job.logs import get_logger
from job.settings import LoraSettings, Settings

log = get_logger(__name__)


def fetch_parent(settings: Settings, base_model: dict, folder: Path) -> dict | None:
    """Download the parent adapter into folder and check that it fits this run. Returns what the
    manifest records of the parent, or None when there is none to start from."""
    init = settings.lora.init_from
    if not init:
        return None
    if init == "latest":
        latest = retrain.read_latest(settings.output_uri)
        if latest is None:
            log.warning("nothing published under the output prefix yet: training fresh LoRA weights", init_from="latest")
            return None
        adapter_uri = storage.join(settings.output_uri, latest["run_id"], "adapter")
    else:
        adapter_uri = init.rstrip("/")
    storage.fetch_prefix(adapter_uri, folder, ModelLoadError)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise ConfigError(f"QLORA_LORA__INIT_FROM: {adapter_uri} holds no adapter_config.json and adapter_model.safetensors")
    check_shape(_adapter_config(folder, adapter_uri), settings.lora, adapter_uri)
    manifest_uri = adapter_uri.rsplit("/", 1)[0] + "/" + publish.MANIFEST
    manifest_bytes = storage.read_bytes(manifest_uri) if adapter_uri.endswith("/adapter") else None
    manifest = publish.parse_manifest(manifest_bytes, manifest_uri, ModelLoadError) if manifest_bytes else None
    if manifest is None:
        log.warning("no manifest beside the parent adapter: its base model is checked by its weights' shapes only", adapter=adapter_uri)
    else:
        check_base(manifest["base_model"], base_model, adapter_uri)
    parent = {"adapter_uri": adapter_uri, "run_id": manifest["run_id"] if manifest else None,
              "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest() if manifest_bytes else None}
    log.info("warm start", **parent)
    return parent


def _adapter_config(folder: Path, uri: str) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as why:
        raise ModelLoadError(f"QLORA_LORA__INIT_FROM: {uri}/adapter_config.json is not JSON: {one_line(why, 200)}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"QLORA_LORA__INIT_FROM: {uri}/adapter_config.json is not a JSON object")
    return config


def check_shape(config: dict, lora: LoraSettings, uri: str) -> None:
    """The parent adapter's r, alpha and target modules are this run's (its weights go into this run's adapter)."""
    theirs = {"r": config.get("r"), "alpha": config.get("lora_alpha"), "target_modules": sorted(config.get("target_modules") or [])}
    ours = {"r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
    if theirs != ours:
        different = ", ".join(f"{k} {theirs[k]} there, {ours[k]} here" for k in ours if theirs[k] != ours[k])
        raise ConfigError(f"QLORA_LORA__INIT_FROM: {uri} has another LoRA shape ({different})")


def check_base(theirs: dict, ours: dict, uri: str) -> None:
    """The parent was trained on this run's base model: name, revision and content fingerprint."""
    keys = ("name", "revision", "fingerprint")
    if any(theirs.get(k) != ours.get(k) for k in keys):
        raise ConfigError(f"QLORA_LORA__INIT_FROM: {uri} was trained on base model {theirs.get('name')!r} "
                          f"(fingerprint {str(theirs.get('fingerprint'))[:12]}), this run's is {ours.get('name')!r} "
                          f"(fingerprint {str(ours.get('fingerprint'))[:12]})")


def load_into(model, folder: Path) -> None:
    """Put the parent's LoRA weights into the freshly attached adapter (either engine's peft model)."""
    from job import engine

    try:
        engine.load_adapter_weights(model, folder)
    except ValueError as error:
        raise ConfigError(f"QLORA_LORA__INIT_FROM: the parent {error}") from None
