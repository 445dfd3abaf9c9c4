import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from job import storage
from job.errors import ExitCode, StorageError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_multipart_round_trip_keeps_every_byte(s3, bucket, tmp_path):
    data = os.urandom(21 * 2**20)  # 21 MiB: two 16 MiB parts
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    uri = f"s3://{bucket}/runs/big.bin"
    storage.put_file(source, uri)
    head = s3.head_object(Bucket=bucket, Key="runs/big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-2"), "uploaded in two parts"
    back = storage.fetch_file(uri, tmp_path / "back" / "big.bin")
    assert _sha(back.read_bytes()) == _sha(data)
    assert not list((tmp_path / "back").glob("*.partial"))
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_prefix_download_keeps_relative_paths(s3, bucket, tmp_path):
    files = {"model/config.json": b"{}", "model/model.safetensors": os.urandom(4096), "model/sub/tokenizer.json": b"[1]",
             "modelx/other": b"not under the prefix"}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    dest = storage.fetch_prefix(f"s3://{bucket}/model/", tmp_path / "m")
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {"config.json": b"{}", "model.safetensors": files["model/model.safetensors"], "sub/tokenizer.json": b"[1]"}


def test_content_fingerprint_changes_with_any_object_of_a_prefix_or_folder(s3, bucket, tmp_path):
    """Periodic retraining compares it to tell a base model replaced in place (same names, same sizes)."""
    weights = os.urandom(4096)
    s3.put_object(Bucket=bucket, Key="base/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="base/model.safetensors", Body=weights)
    s3.put_object(Bucket=bucket, Key="basex/other", Body=b"not under the prefix")
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"{}")
    (folder / "model.safetensors").write_bytes(weights)
    for uri, rewrite in ((f"s3://{bucket}/base", lambda body: s3.put_object(Bucket=bucket, Key="base/model.safetensors", Body=body)),
                         (str(folder), (folder / "model.safetensors").write_bytes)):
        first = storage.content_fingerprint(uri)
        assert storage.content_fingerprint(uri) == first
        rewrite(weights)  # written again, the same bytes: the same content
        assert storage.content_fingerprint(uri) == first
        rewrite(bytes(reversed(weights)))  # other weights of the same size
        assert storage.content_fingerprint(uri) != first
        rewrite(weights)
        assert storage.content_fingerprint(uri) == first
    assert storage.content_fingerprint(f"file://{folder}") == storage.content_fingerprint(str(folder))


def test_a_base_model_replaced_in_s3_is_fetched_again_not_read_from_the_cache(s3, bucket, tmp_path):
    from job import engine
    from job.settings import Settings

    settings = Settings(dataset_uri="data.jsonl", output_uri=str(tmp_path / "out"),
                        model={"name": f"s3://{bucket}/base", "cache_dir": tmp_path / "cache"})
    sources = []
    for weights in (b"old weights", b"new weights"):  # same key, same size
        s3.put_object(Bucket=bucket, Key="base/model.safetensors", Body=weights)
        for _ in range(2):
            sources.append(engine.fetch_base_model(settings, engine.base_model_fingerprint(settings)))
        assert (Path(sources[-1]) / "model.safetensors").read_bytes() == weights
    assert sources[0] == sources[1] != sources[2] == sources[3]


def test_empty_prefix_is_a_permanent_error(bucket, tmp_path):
    with pytest.raises(StorageError, match="no objects under") as error:
        storage.fetch_prefix(f"s3://{bucket}/nothing-here", tmp_path)
    assert error.value.exit_code == ExitCode.CONFIG


def test_put_if_absent_refuses_the_second_write(s3, bucket):
    uri = f"s3://{bucket}/run/manifest.json"
    assert storage.put_if_absent(b"first", uri) is True
    assert storage.put_if_absent(b"second", uri) is False
    assert s3.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read() == b"first"
    assert storage.read_bytes(uri) == b"first"
    assert storage.read_bytes(f"s3://{bucket}/run/absent.json") is None


def test_put_if_absent_on_local_paths(tmp_path):
    target = tmp_path / "out" / "manifest.json"
    assert storage.put_if_absent(b"a", str(target)) is True
    assert storage.put_if_absent(b"b", f"file://{target}") is False
    assert target.read_bytes() == b"a" and sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]


def test_missing_object_and_bucket_name_the_object_and_do_not_retry(bucket, tmp_path):
    with pytest.raises(StorageError, match=f"s3://{bucket}/absent.jsonl") as error:
        storage.fetch_file(f"s3://{bucket}/absent.jsonl", tmp_path / "x")
    assert error.value.exit_code == ExitCode.CONFIG
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/x.jsonl") as error:
        storage.fetch_file("s3://no-such-bucket-here/x.jsonl", tmp_path / "y")
    assert error.value.exit_code == ExitCode.CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_with_storage_code_after_bounded_retries(monkeypatch, tmp_path):
    from tests.conftest import S3_ENV, run_job

    endpoint = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = run_job(env={**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint, "QLORA_DATASET_URI": "s3://data/train.jsonl",
                          "QLORA_OUTPUT_URI": "s3://models/runs", "QLORA_WORK_DIR": str(tmp_path)})
    elapsed = time.monotonic() - started
    assert result.returncode == ExitCode.STORAGE, result.stderr
    assert elapsed < 30
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "s3://models/runs" in line and "Could not connect" in line
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


def test_check_uri():
    assert storage.check_uri("s3://bucket-1/a/b") == "s3://bucket-1/a/b"
    assert storage.check_uri("/data/x.jsonl") == "/data/x.jsonl"
    for bad in ("s3://", "s3://UPPER/x", "http://example.com/x", ""):
        with pytest.raises(ValueError):
            storage.check_uri(bad)


def test_a_local_model_folder_is_hashed_once_and_again_only_where_a_file_changed(tmp_path, monkeypatch):
    """The fingerprint of a mounted model folder costs a stat a file after its first run (issue 30 item 5), and
    still changes with the content: retraining and warm starts compare it."""
    folder, cache = tmp_path / "model", tmp_path / "cache" / "fingerprint.json"
    folder.mkdir()
    weights = os.urandom(1 << 20)
    for name, body in (("config.json", b"{}"), ("model.safetensors", weights)):
        (folder / name).write_bytes(body)
        os.utime(folder / name, ns=(time.time_ns() - 10**10,) * 2)  # written a while ago, as a mounted model is
    hashed = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    first = storage.content_fingerprint(str(folder), cache)
    assert sorted(hashed) == ["config.json", "model.safetensors"] and first == storage.content_fingerprint(str(folder))
    hashed.clear()
    assert storage.content_fingerprint(str(folder), cache) == first and hashed == [], "nothing is read again"
    (folder / "model.safetensors").write_bytes(bytes(reversed(weights)))  # other weights of the same size, just now
    changed = storage.content_fingerprint(str(folder), cache)
    assert changed != first and hashed == ["model.safetensors"]
    hashed.clear()
    assert storage.content_fingerprint(str(folder), cache) == changed and hashed == ["model.safetensors"], \
        "a file changed within the last 2 s is hashed again: it may change again within one mtime tick"
    cache.write_text("[not, json")
    assert storage.content_fingerprint(str(folder), cache) == changed, "a broken cache is only a miss"
