"""torch.compile's caches kept under the output prefix, so the next run skips most of the first step's compile.

Unsloth compiles its decoder regions with torch.compile on the first step (Inductor, Triton, autotuning:
~19 s on an H200, bench/RESULTS.md run 29). PyTorch's portable "mega-cache"
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) serialises what was compiled into one blob;
the job stores it at <output_uri>/compile-cache/<key>.bin after training and loads it before the next run
trains. The key names the versions and the GPU: torch checks both again on load, and a graph of other
shapes is a cache miss, never a wrong kernel.

Trust: a cache holds generated code that the next run executes, so whoever can write the output prefix
can run code in the training pod. That is the job's own prefix (its adapters and latest.json already
live there); QLORA_TRAIN__COMPILE_CACHE=false turns the cache off. A cache is only a speed-up: any
failure to read, load or write it is a warning, never a failed run."""

import hashlib
import json
import time

from job import storage
from job.errors import one_line
from job.logs import get_logger

log = get_logger(__name__)
PREFIX = "compile-cache"
MAX_BYTES = 1 << 30  # stored caches measured 7-15 MB (bench/RESULTS.md, runs 30-32); a larger object is not read


def key() -> str:
    """Versions of everything that generates or checks the compiled code, and the GPU it was compiled for."""
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "triton", "transformers", "unsloth", "unsloth_zoo", "peft", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    identity = json.dumps({"versions": versions, "device": device}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def uri(output_uri: str) -> str:
    return storage.join(output_uri, PREFIX, f"{key()}.bin")


def restore(output_uri: str) -> int:
    """Load the stored cache, if there is one, into torch's caches. Returns its size in bytes (0: none)."""
    import torch

    started, where = time.perf_counter(), uri(output_uri)
    try:
        blob = storage.read_bytes(where, max_bytes=MAX_BYTES)
        if blob and torch.compiler.load_cache_artifacts(blob) is None:
            raise ValueError("torch found no cache artifacts in it")
    except Exception as error:  # noqa: BLE001 (a cache that cannot be used only costs the compile)
        log.warning("compile cache not used", uri=where, error=one_line(error, 200))
        return 0
    log.info("compile cache loaded" if blob else "no compile cache yet", uri=where, bytes=len(blob or b""),
             seconds=round(time.perf_counter() - started, 3))
    return len(blob or b"")


def save(output_uri: str, restored_bytes: int) -> int:
    """Store what this process compiled (and loaded) when it holds more than the cache it started from.
    Returns the bytes written (0: nothing new, or nothing compiled)."""
    import torch

    where = uri(output_uri)
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        blob = artifacts[0] if artifacts else b""
        if len(blob) <= restored_bytes:
            return 0
        storage.put_bytes(blob, where)
    except Exception as error:  # noqa: BLE001 (as in restore)
        log.warning("compile cache not saved", uri=where, error=one_line(error, 200))
        return 0
    log.info("compile cache saved", uri=where, bytes=len(blob))
    return len(blob)
