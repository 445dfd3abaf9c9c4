"""Hostile inputs (docs/bad-input.md, "What a bucket may hold"): object keys that climb out of their folder,
text that cannot be encoded, decompression bombs, and documents the job reads back from the bucket
(latest.json, manifests, checkpoint records) that it did not write. Keys are put on the real S3 server."""

import contextlib
import gzip
import json
import time
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job import storage
from job.data import RowError, _parse, convert_row, validate_dataset
from job.errors import ConfigError, DataError, ExitCode, ModelLoadError, StorageError
from tests.conftest import run_job

# key under the prefix -> what the one-line error says of it
CLIMBING_KEYS = {
    "../escaped.txt": "has an empty, '.' or '..' path component",
    "sub/../../escaped.txt": "has an empty, '.' or '..' path component",
    "../../../../../../tmp/escaped.txt": "has an empty, '.' or '..' path component",
    "/escaped.txt": "is an absolute path",  # the key "model//escaped.txt"
    "./config.json": "has an empty, '.' or '..' path component",
    "a//b.txt": "has an empty, '.' or '..' path component",
}


def _files_outside(root: Path, dest: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_relative_to(dest))


def _put_prefix(s3, bucket: str, prefix: str, keys: dict[str, bytes]) -> None:
    for key, body in keys.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)


@pytest.mark.parametrize("key", CLIMBING_KEYS)
@pytest.mark.parametrize("error", [StorageError, ModelLoadError, DataError])
def test_a_key_that_climbs_out_is_refused_by_name_before_anything_is_written(s3, bucket, tmp_path, key, error):
    prefix = f"model-{error.__name__}-{list(CLIMBING_KEYS).index(key)}"  # the bucket is shared by the cases
    _put_prefix(s3, bucket, prefix, {"config.json": b"{}", key: b"written by whoever can write the bucket"})
    dest = tmp_path / "cache" / "model"
    with pytest.raises(error) as raised:
        storage.fetch_prefix(f"s3://{bucket}/{prefix}", dest, error)
    assert repr(key) in str(raised.value) and CLIMBING_KEYS[key] in str(raised.value)
    assert "\n" not in str(raised.value)
    assert raised.value.exit_code == {StorageError: ExitCode.STORAGE, ModelLoadError: ExitCode.MODEL_LOAD, DataError: ExitCode.DATA}[error]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing is written, inside dest or out"


def test_a_key_through_a_link_in_the_destination_is_refused(s3, bucket, tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    _put_prefix(s3, bucket, "linked", {"link/escaped.txt": b"x"})
    with pytest.raises(StorageError, match="resolves outside the destination folder"):
        storage.fetch_prefix(f"s3://{bucket}/linked", dest)
    assert not list(outside.iterdir())


def test_ordinary_keys_still_download_with_their_folders(s3, bucket, tmp_path):
    _put_prefix(s3, bucket, "fine", {"config.json": b"{}", "sub/tok..json": b"[]", "..hidden-but-fine": b"1"})
    dest = storage.fetch_prefix(f"s3://{bucket}/fine", tmp_path / "m")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["..hidden-but-fine", "config.json", "sub/tok..json"]


def test_a_dataset_prefix_with_a_climbing_key_is_a_data_error(s3, bucket, tmp_path):
    from job.data import fetch_dataset

    _put_prefix(s3, bucket, "data", {"part-0.jsonl": b'{"instruction": "Q", "output": "A"}\n', "../part-1.jsonl": b"{}\n"})
    with pytest.raises(DataError, match=r"refusing object key '\.\./part-1\.jsonl'"):
        fetch_dataset(f"s3://{bucket}/data/", tmp_path / "input")
    assert not (tmp_path / "input").exists() or not list((tmp_path / "input").iterdir())


def test_a_checkpoint_with_a_climbing_key_is_refused_as_storage(s3, bucket, tmp_path):
    from job.checkpoint import fetch_latest_checkpoint

    _put_prefix(s3, bucket, "runs/r1/checkpoints/checkpoint-5", {"trainer_state.json": b"{}", "../../../../x": b"x", "COMPLETE": b""})
    with pytest.raises(StorageError, match=r"refusing object key '\.\./\.\./\.\./\.\./x'") as raised:
        fetch_latest_checkpoint(f"s3://{bucket}/runs/r1", tmp_path / "work")
    assert raised.value.exit_code == ExitCode.STORAGE and not _files_outside(tmp_path, tmp_path / "nowhere")


def test_a_warm_start_parent_with_a_climbing_key_is_a_model_load_error(s3, bucket, clean_env, tmp_path):
    from job.settings import Settings
    from job.warmstart import fetch_parent

    _put_prefix(s3, bucket, "parent/adapter", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x", "../../../x": b"x"})
    settings = Settings(dataset_uri=f"s3://{bucket}/d.jsonl", output_uri=f"s3://{bucket}/runs",
                        lora={"init_from": f"s3://{bucket}/parent/adapter"})
    with pytest.raises(ModelLoadError, match=r"refusing object key '\.\./\.\./\.\./x'"):
        fetch_parent(settings, {"name": "m"}, tmp_path / "parent")
    assert not list(tmp_path.rglob("x"))


def _champion_layout(s3, bucket: str, key: str) -> dict:
    base = {"name": "m", "revision": None, "fingerprint": "f"}
    manifest = {"run_id": "old", "published_at": "2026-12-01T00:00:00+00:00", "dataset": {"sha256": "d" * 64}, "base_model": base,
                "objects": [{"key": key, "size": 1, "sha256": "0" * 64}]}
    s3.put_object(Bucket=bucket, Key="runs/old/manifest.json", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=bucket, Key=f"runs/old/{key}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="runs/latest.json", Body=json.dumps({"run_id": "old", "base_model": base}).encode())
    return base


def test_a_champion_whose_manifest_lists_a_climbing_key_is_a_model_load_error(s3, bucket, clean_env, tmp_path):
    from job.evaluate import fetch_champion
    from job.settings import Settings

    base = _champion_layout(s3, bucket, "adapter/../../../../escaped.txt")
    settings = Settings(dataset_uri=f"s3://{bucket}/d.jsonl", output_uri=f"s3://{bucket}/runs")
    with pytest.raises(ModelLoadError, match=r"refusing object key '\.\./\.\./\.\./\.\./escaped\.txt'"):
        fetch_champion(settings, base, "new", tmp_path / "work" / "champion")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_plan_refuses_a_climbing_key_in_the_model_prefix(s3, bucket, clean_env, tmp_path):
    from job.preflight import _tokenizer_without_weights
    from job.settings import Settings

    _put_prefix(s3, bucket, "model", {"config.json": b"{}", "model.safetensors": b"x", "../tokenizer.json": b"{}"})
    settings = Settings(dataset_uri=f"s3://{bucket}/d.jsonl", output_uri=f"s3://{bucket}/runs", model={"name": f"s3://{bucket}/model"})
    with pytest.raises(ModelLoadError, match=r"refusing object key '\.\./tokenizer\.json'"):
        _tokenizer_without_weights(settings, tmp_path / "model")
    assert not (tmp_path / "tokenizer.json").exists()


def test_the_job_refuses_a_model_prefix_with_a_climbing_key_and_publishes_nothing(s3, bucket, s3_env, tiny_model, tmp_path):
    """End to end, as the issue found it: the model prefix held ../ keys, and the run wrote beside its cache and went on."""
    _put_prefix(s3, bucket, "model", {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
    _put_prefix(s3, bucket, "model", {"../../escaped.txt": b"x"})
    s3.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"instruction": "Q", "output": "A"}\n')
    work = tmp_path / "tmp" / "work"
    result = run_job(env={**s3_env, "HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": f"s3://{bucket}/data/train.jsonl",
                          "QLORA_OUTPUT_URI": f"s3://{bucket}/runs", "QLORA_MODEL__NAME": f"s3://{bucket}/model/",
                          "QLORA_MODEL__CACHE_DIR": str(tmp_path / "tmp" / "models"), "QLORA_WORK_DIR": str(work),
                          "QLORA_RUN_ID": "hostile", "QLORA_TRAIN__MAX_STEPS": "2"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == ExitCode.MODEL_LOAD, result.stderr[-2000:]
    assert len(lines) == 1 and "refusing object key '../../escaped.txt'" in lines[0], lines
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="runs/").get("Contents")


# --- documents read back from the bucket ---

@pytest.mark.parametrize("body", [b"[]", b'"latest"', b"{}", b'{"run_id": "../../x", "base_model": {}}', b'{"run_id": "..", "base_model": {}}',
                                  b'{"run_id": "ok", "base_model": "m"}', b'{"run_id": "ok", "base_model": {}, "published_at": 7}',
                                  b"[" * 100_000, b"\xff\xfe", b"{"])
def test_a_latest_json_the_job_did_not_write_is_treated_as_absent(s3, bucket, body):
    from job.retrain import read_latest

    s3.put_object(Bucket=bucket, Key="runs/latest.json", Body=body)
    assert read_latest(f"s3://{bucket}/runs") is None


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"run_id": "..", "published_at": "", "dataset": {"sha256": ""}, "base_model": {}, "objects": []}',
                                  b'{"run_id": "r", "published_at": "", "dataset": {"sha256": ""}, "base_model": {}, "objects": [{"key": 1}]}',
                                  b"[" * 100_000, b"\x00"])
def test_a_manifest_the_job_did_not_write_is_a_one_line_error_of_the_readers_code(s3, bucket, body):
    from job.publish import find_manifest

    s3.put_object(Bucket=bucket, Key="runs/r/manifest.json", Body=body)
    for error in (ConfigError, ModelLoadError):
        with pytest.raises(error, match="not a manifest this job can read") as raised:
            find_manifest(f"s3://{bucket}/runs/r", error)
        assert "\n" not in str(raised.value)


def test_retention_leaves_a_run_with_an_unreadable_manifest_alone(s3, bucket):
    from job.retrain import apply_retention

    s3.put_object(Bucket=bucket, Key="runs/odd/manifest.json", Body=b"not json")
    s3.put_object(Bucket=bucket, Key="runs/odd/adapter/a", Body=b"x")
    assert apply_retention(f"s3://{bucket}/runs", 1, protect=set()) == []
    assert s3.head_object(Bucket=bucket, Key="runs/odd/adapter/a")


def test_a_document_larger_than_its_limit_is_refused_before_its_body_is_read(s3, bucket):
    s3.put_object(Bucket=bucket, Key="runs/latest.json", Body=b" " * 2048)
    with pytest.raises(StorageError, match="2048 bytes, more than the 1024"):
        storage.read_bytes(f"s3://{bucket}/runs/latest.json", max_bytes=1024)


@pytest.mark.parametrize("run_id", ["..", ".", ".hidden", "-x", "ok/../x"])
def test_a_run_id_that_is_a_path_component_is_refused(clean_env, run_id):
    from pydantic import ValidationError

    from job.settings import Settings

    with pytest.raises(ValidationError, match="starting with a letter or digit"):
        Settings(dataset_uri="s3://b/d.jsonl", output_uri="s3://b/runs", run_id=run_id)


@pytest.mark.parametrize("record", ['{"step": "5", "eval_loss": 1.0}', "[]", "{", '{"step": 5}'])
def test_a_checkpoints_best_adapter_record_the_job_did_not_write_is_no_candidate(tmp_path, record):
    from job.checkpoint import best_adapter_callback

    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "best-adapter.safetensors").write_bytes(b"x")
    (checkpoint / "best-adapter.json").write_text(record)
    callback = best_adapter_callback(tmp_path / "best", checkpoint)
    assert callback.best is None and not (tmp_path / "best").exists()


@pytest.mark.parametrize("state", ['{"global_step": "5"}', "[]", '{"global_step": null}'])
def test_a_checkpoint_whose_trainer_state_has_the_wrong_types_does_not_validate(tmp_path, state):
    import torch
    from safetensors.torch import save_file

    from job.checkpoint import valid_checkpoint

    (tmp_path / "trainer_state.json").write_text(state)
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    assert valid_checkpoint(tmp_path) is False


# --- rows: text that cannot be encoded, and random JSON through parser, converter and tokenizer ---

def test_a_lone_surrogate_is_a_rejected_row_with_shard_and_line_counted_in_the_ratio(tmp_path):
    good = b'{"instruction": "Q", "output": "A"}\n'
    source = tmp_path / "train.jsonl"
    source.write_bytes(good + b'{"instruction": "Q\\ud800", "output": "A"}\n' + b'{"messages": [{"role": "user", "content": "x"}, '
                       b'{"role": "assistant", "content": "\\udfff"}]}\n' + good)
    report = validate_dataset(source, tmp_path / "out")
    assert (report.accepted, report.rejected, report.reject_ratio) == (2, 2, 0.5)
    assert [(r["line"], r["shard"]) for r in report.first_rejects] == [(2, str(source)), (3, str(source))]
    assert "lone surrogate" in report.first_rejects[0]["reason"]
    assert [json.loads(line)["line"] for line in report.train_path.read_text(encoding="utf-8").splitlines()] == [1, 4]


def test_a_system_prompt_setting_that_is_not_utf8_is_a_settings_error(clean_env):
    from pydantic import ValidationError

    from job.settings import Settings

    with pytest.raises(ValidationError, match="is not valid UTF-8 text"):  # os.environ decodes bad bytes to lone surrogates
        Settings(dataset_uri="s3://b/d.jsonl", output_uri="s3://b/runs", data={"system_prompt": "be \udcff brief"})


def test_validate_data_exits_3_on_a_lone_surrogate_not_1(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_bytes(b'{"instruction": "\\ud800", "output": "A"}\n')
    result = run_job("validate-data", str(source), env={"QLORA_WORK_DIR": str(tmp_path / "work")})
    assert result.returncode == ExitCode.DATA, result.stderr
    assert "Traceback" not in result.stderr and "line 1: holds a lone surrogate" in result.stderr


# Every character, with lone surrogates (0.2% of code points) drawn as often as all the others together, and JSON
# values of any shape.
# (st.text over a union of alphabets almost never draws the second one: lists of characters, joined, do.) Half the
# strings are ordinary text, so that rows are accepted too and reach the tokenizer.
TEXT = st.text(max_size=40) | st.lists(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=40).map("".join)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | TEXT, "content": TEXT | JSON_VALUES})
ROWS = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT | JSON_VALUES, "system": TEXT}),
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"prompt": TEXT | st.lists(MESSAGE, max_size=3), "completion": TEXT | st.lists(MESSAGE, max_size=2)}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=ROWS, ascii_only=st.booleans(), system_prompt=st.none() | st.text(max_size=40))
def test_any_json_row_is_an_accepted_row_or_a_row_error(tiny_tokenizer, row, ascii_only, system_prompt):
    """Through the row parser, the converter, the accepted row's own line in train.jsonl and the tokenizer
    path (chat template, then tokens) that measures it: nothing else may come out, so no row ends as exit 1."""
    line = json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n"
    try:
        kind, prompt, completion = convert_row(_parse(1, line, 1 << 20), system_prompt)
    except RowError as error:
        str(error).encode("utf-8")  # the reason itself goes to rejects.jsonl and the log
        return
    json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False).encode("utf-8")
    text = tiny_tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=200, deadline=None)
@given(line=st.binary(max_size=200))
def test_any_bytes_are_an_accepted_row_or_a_row_error(line):
    with contextlib.suppress(RowError):
        convert_row(_parse(2, line, 1 << 20))


# --- decompression: linear in the bytes, bounded memory, bombs refused ---

BLANK_LINES = (b" " * 63 + b"\n") * (1 << 14)  # 1 MiB of 64-byte whitespace lines
ONE_LINE = b"a" * (1 << 20)  # 1 MiB without a newline


def _bomb(path: Path, suffix: str, block: bytes, mib: int, level: int = 1) -> Path:
    """`mib` MiB of `block` repeated, as concatenated gzip members or zstd frames (both valid files)."""
    one = gzip.compress(block, level) if suffix == "gz" else zstandard.ZstdCompressor(level=level).compress(block)
    target = path / f"bomb-{mib}.jsonl.{suffix}"
    target.write_bytes(one * mib)
    return target


def _seconds(source: Path, out: Path, **limits) -> float:
    best = float("inf")
    for _ in range(5):  # the fastest of five: this machine is noisy
        started = time.perf_counter()
        validate_dataset(source, out, **limits)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("suffix", ["gz", "zst"])
@pytest.mark.parametrize("block", [BLANK_LINES, ONE_LINE], ids=["newlines", "no-newlines"])
def test_decompression_time_is_linear_and_memory_does_not_grow_with_size(tmp_path, suffix, block):
    # Sizes that take a tenth of a second or more (a line a byte is slow, one long line runs at ~1 GB/s): timer noise.
    mib = 16 if block is BLANK_LINES else 128
    small, large = _bomb(tmp_path, suffix, block, mib), _bomb(tmp_path, suffix, block, 2 * mib)
    small_s, large_s = _seconds(small, tmp_path / "o", max_compression_ratio=0), _seconds(large, tmp_path / "o", max_compression_ratio=0)
    print(f"{suffix} {'newlines' if block is BLANK_LINES else 'one line'}: {mib} MiB {small_s:.3f} s, {2 * mib} MiB {large_s:.3f} s "
          f"({2 * mib / large_s:.0f} MiB/s decompressed, ratio {large_s / small_s:.2f})")
    assert large_s <= 2.5 * small_s
    peaks = []
    for source in (small, large):
        tracemalloc.start()
        validate_dataset(source, tmp_path / "o", max_compression_ratio=0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    print(f"peak traced memory: {peaks[0] >> 10} KiB at {mib} MiB, {peaks[1] >> 10} KiB at {2 * mib} MiB")
    assert peaks[1] <= 1.2 * peaks[0] + (256 << 10) and peaks[1] < 32 << 20


@pytest.mark.parametrize("suffix", ["gz", "zst"])
@pytest.mark.parametrize("block", [b"\n" * (1 << 20), ONE_LINE], ids=["newlines", "no-newlines"])
def test_a_1_gib_bomb_is_refused_after_a_few_mib(tmp_path, suffix, block):
    source = _bomb(tmp_path, suffix, block, 1024, level=9)
    started = time.perf_counter()
    with pytest.raises(DataError, match="refused as a decompression bomb") as raised:
        validate_dataset(source, tmp_path / "o")
    seconds = time.perf_counter() - started
    decompressed_mib = int(str(raised.value).split("(")[1].split(" MiB")[0])
    print(f"{suffix}: 1 GiB in {source.stat().st_size >> 10} KiB refused after {decompressed_mib} MiB in {seconds:.2f} s")
    assert decompressed_mib <= 64


def test_a_real_compressed_dataset_is_far_below_the_limit(tmp_path):
    from tests.conftest import SAMPLE

    for suffix, compress in (("gz", lambda b: gzip.compress(b, 9)), ("zst", lambda b: zstandard.ZstdCompressor(level=19).compress(b))):
        source = tmp_path / f"sample.jsonl.{suffix}"
        source.write_bytes(compress(SAMPLE.read_bytes() * 50))
        assert validate_dataset(source, tmp_path / "o").accepted == 50 * validate_dataset(SAMPLE, tmp_path / "p").accepted
