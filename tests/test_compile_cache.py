"""torch.compile's mega-cache through the output prefix (job/compile_cache.py), on a real S3 server: a second
process with empty local caches loads what the first compiled and Inductor hits its cache instead of compiling."""

import json
import os
import subprocess
import sys

import pytest

from job import storage

PROGRAM = """
import json, sys, torch
from torch._dynamo.utils import counters
from job import compile_cache
restored = compile_cache.restore(sys.argv[1])
step = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum())
step(torch.randn(64))
saved = compile_cache.save(sys.argv[1], restored)
print("RESULT " + json.dumps({"restored": restored, "saved": saved, "hits": counters["inductor"]["fxgraph_cache_hit"],
                              "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _run(output_uri: str, cache_dir) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}  # a fresh node's empty local caches
    done = subprocess.run([sys.executable, "-c", PROGRAM, output_uri], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.long  # two processes that compile (~60 s on 2 cores): make test-long
def test_a_second_run_loads_the_first_runs_compiled_code_from_s3(s3, bucket, tmp_path):
    output_uri = f"s3://{bucket}/runs"
    first = _run(output_uri, tmp_path / "node-1")
    assert first["restored"] == 0 and first["misses"] >= 1 and first["saved"] > 0, first
    keys = storage.list_keys(f"{output_uri}/compile-cache/")
    assert len(keys) == 1 and keys[0].endswith(".bin"), keys
    assert s3.head_object(Bucket=bucket, Key=f"runs/compile-cache/{keys[0].rsplit('/', 1)[-1]}")["ContentLength"] == first["saved"]

    second = _run(output_uri, tmp_path / "node-2")
    assert second["restored"] == first["saved"] and second["hits"] >= 1 and second["misses"] == 0, second
    assert second["saved"] == 0, "nothing new was compiled: the stored cache stays as it is"


def test_a_corrupt_cache_is_a_warning_not_a_failure(s3, bucket):
    from job import compile_cache

    output_uri = f"s3://{bucket}/runs"
    assert compile_cache.restore(output_uri) == 0, "none stored yet"
    storage.put_bytes(b"not a cache", compile_cache.uri(output_uri))
    assert compile_cache.restore(output_uri) == 0, "an unusable cache counts as none, so the run's own compile replaces it"
    assert compile_cache.uri(output_uri).startswith(f"{output_uri}/compile-cache/") and compile_cache.uri(output_uri).endswith(".bin")
