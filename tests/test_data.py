import json
import tracemalloc

import pytest

from job.data import check_report, validate_dataset
from job.errors import DataError
from tests.conftest import SAMPLE, run_job


def _write(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def _rows(report):
    return [json.loads(line) for line in report.train_path.read_text().splitlines()]


def test_each_format_becomes_conversational_prompt_completion(tmp_path):
    source = _write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Q1", "output": "A1"}),
        json.dumps({"instruction": "Q2", "input": "ctx", "system": "be brief", "output": "A2"}),
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q3"},
                                 {"role": "assistant", "content": "x"}, {"role": "user", "content": "more"},
                                 {"role": "assistant", "content": "A3"}]}),
        json.dumps({"prompt": "Q4", "completion": "A4"}),
        json.dumps({"prompt": [{"role": "user", "content": "Q5"}], "completion": [{"role": "assistant", "content": "A5"}]}),
        "",
    ])
    report = validate_dataset(source, tmp_path / "out")
    assert (report.accepted, report.rejected, report.blank) == (5, 0, 1)
    assert dict(report.formats) == {"instruction": 2, "messages": 1, "prompt": 2}
    rows = _rows(report)
    assert rows[0] == {"prompt": [{"role": "user", "content": "Q1"}], "completion": [{"role": "assistant", "content": "A1"}],
                       "format": "instruction", "line": 1, "shard": 0, "source": 0}
    assert rows[1]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q2\n\nctx"}]
    assert [m["content"] for m in rows[2]["prompt"]] == ["S", "Q3", "x", "more"] and rows[2]["completion"][0]["content"] == "A3"
    assert rows[3]["prompt"] == [{"role": "user", "content": "Q4"}]
    assert rows[4]["completion"] == [{"role": "assistant", "content": "A5"}]


def test_the_bundled_sample_is_clean():
    report = validate_dataset(SAMPLE, SAMPLE.parent.parent.parent / ".work" / "sample-check")
    assert report.accepted >= 60 and report.rejected == 0


def test_system_prompt_setting_fills_rows_without_one(tmp_path):
    source = _write(tmp_path / "d.jsonl", [json.dumps({"instruction": "Q", "output": "A"})])
    report = validate_dataset(source, tmp_path / "o", system_prompt="You are a 6G expert.")
    assert _rows(report)[0]["prompt"][0] == {"role": "system", "content": "You are a 6G expert."}


BAD_ROWS = [
    (b'{"instruction": "Q", "output": "A"', "invalid JSON"),
    (b"not json at all", "invalid JSON"),
    (b'["instruction", "output"]', "expected a JSON object, got array"),
    (b'"just a string"', "expected a JSON object, got string"),
    (b'{"instruction": "Q", "output": "A", "output": "B"}', "duplicate key 'output'"),
    (b'{"question": "Q", "answer": "A"}', "no known fields"),
    (b'{"instruction": "Q"}', "missing 'output'"),
    (b'{"output": "A"}', "missing 'instruction'"),
    (b'{"instruction": 42, "output": "A"}', "'instruction' must be a string, got number"),
    (b'{"instruction": "Q", "output": ""}', "'output' is empty"),
    (b'{"instruction": "   ", "output": "A"}', "'instruction' is empty"),
    (b'{"instruction": "Q", "output": null}', "missing 'output'"),
    (b'{"instruction": "Q", "input": ["x"], "output": "A"}', "'input' must be a string, got array"),
    (b'{"instruction": "Q", "output": "A\\u0000"}', "NUL character"),
    (b'{"instruction": "Q", "output": "A", "messages": []}', "mixes formats"),
    (b'{"messages": "hello"}', "'messages' must be an array"),
    (b'{"messages": []}', "'messages' is empty"),
    (b'{"messages": ["hi"]}', "messages[0] must be an object"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot' is not one of"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}', "missing 'messages[0].content'"),
    (b'{"messages": [{"role": "user", "content": "Q"}]}', "last message in 'messages' must be from the assistant"),
    (b'{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}', "'messages[1].content' is empty"),
    (b'{"messages": [{"role": "assistant", "content": "A"}]}', "no user message"),
    (b'{"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}',
     "only allowed as the first message"),
    (b'{"messages": [{"role": "user", "content": "Q", "name": "x"}, {"role": "assistant", "content": "A"}]}', "unexpected key 'name'"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}]}', "must be a string, got number"),
    (b'{"prompt": "Q"}', "missing 'completion'"),
    (b'{"completion": "A"}', "missing 'prompt'"),
    (b'{"prompt": "Q", "completion": ""}', "'completion' is empty"),
    (b'{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "A"}]}', "exactly one assistant message"),
    (b'{"instruction": "Q", "output": NaN}', "NaN is not allowed"),
    (b'{"instruction": "\xff\xfe", "output": "A"}', "not valid UTF-8"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_rows_are_rejected_with_a_precise_reason(tmp_path, line, reason):
    source = _write(tmp_path / "d.jsonl", [json.dumps({"instruction": "ok", "output": "fine"}), line])
    report = validate_dataset(source, tmp_path / "out")
    assert (report.accepted, report.rejected) == (1, 1)
    reject = json.loads(report.rejects_path.read_text())
    assert reject["line"] == 2 and reason in reject["reason"], reject


def test_over_long_line_is_rejected_without_reading_it_whole(tmp_path):
    long = json.dumps({"instruction": "Q", "output": "x" * 50_000})
    source = _write(tmp_path / "d.jsonl", [long, json.dumps({"instruction": "Q", "output": "A"})])
    report = validate_dataset(source, tmp_path / "out", max_line_bytes=4096)
    assert (report.accepted, report.rejected) == (1, 1)
    assert "longer than 4096 bytes" in report.first_rejects[0]["reason"] and report.first_rejects[0]["line"] == 1


def test_byte_order_mark_on_the_first_line_is_tolerated(tmp_path):
    source = _write(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + json.dumps({"instruction": "Q", "output": "A"}).encode()])
    assert validate_dataset(source, tmp_path / "out").accepted == 1


def test_reject_ratio_gate(tmp_path):
    lines = [json.dumps({"instruction": f"Q{i}", "output": "A"}) for i in range(9)] + ["{broken"]
    report = validate_dataset(_write(tmp_path / "d.jsonl", lines), tmp_path / "out")
    check_report(report, 0.1)  # 10% rejected: allowed
    with pytest.raises(DataError, match=r"1 of 10 rows rejected .*line 10: invalid JSON"):
        check_report(report, 0.05)
    empty = validate_dataset(_write(tmp_path / "e.jsonl", [""]), tmp_path / "out2")
    with pytest.raises(DataError, match="no usable rows"):
        check_report(empty, 1.0)


def test_validation_streams_in_bounded_memory(tmp_path):
    row = json.dumps({"instruction": "What does 6G promise? " * 4, "output": "Lower latency and native AI. " * 20}) + "\n"
    source = tmp_path / "big.jsonl"
    with open(source, "w") as f:
        for _ in range(40_000):
            f.write(row)
    size = source.stat().st_size
    assert size > 25 * 2**20
    tracemalloc.start()
    report = validate_dataset(source, tmp_path / "out")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.accepted == 40_000
    assert peak < size / 50, f"peak {peak} bytes for a {size}-byte file"


def test_validate_data_command_reports_good_and_bad_files(tmp_path):
    good = run_job("validate-data", str(SAMPLE), env={"QLORA_WORK_DIR": str(tmp_path)})
    assert good.returncode == 0, good.stderr
    summary = json.loads(good.stdout)
    assert summary["accepted"] >= 60 and summary["rejected"] == 0 and summary["formats"] == {"instruction": summary["accepted"]}

    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"instruction": "Q", "output": "A"}), '{"instruction": "Q"}', "{oops"])
    result = run_job("validate-data", str(bad), env={"QLORA_WORK_DIR": str(tmp_path)})
    assert result.returncode == 3
    summary = json.loads(result.stdout)
    assert summary["first_rejects"] == [{"line": 2, "reason": "missing 'output'", "shard": str(bad)},
                                        {"line": 3, "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
                                         "shard": str(bad)}]
    assert result.stderr.strip().splitlines() == ["qlora-job: error: 2 of 3 rows rejected (66.7% > QLORA_DATA__MAX_REJECT_RATIO=0.0); "
                                                  "first: line 2: missing 'output'"]


def _shard_folder(root):
    """A Spark-style output folder: three shards (gzip, zstd, plain; one nested) and files that are not data."""
    import gzip

    import zstandard

    rows = [json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) for i in range(5)]
    (root / "a").mkdir(parents=True)
    (root / "_temporary").mkdir()
    (root / "a" / "part-0.jsonl.gz").write_bytes(gzip.compress(f"{rows[0]}\n{rows[1]}\n".encode()))
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(f"{rows[2]}\n{{oops\n".encode()))
    (root / "c.jsonl").write_text(f"{rows[3]}\n{rows[4]}\n")
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".c.jsonl.crc").write_bytes(b"\x00")
    (root / "_temporary" / "part-9.jsonl").write_text("not read\n")
    return root


def test_a_folder_of_shards_is_read_in_key_order_and_rejects_name_the_shard(tmp_path):
    from job.data import fetch_dataset

    folder = _shard_folder(tmp_path / "data")
    shards = fetch_dataset(str(folder), tmp_path / "in")
    assert [s.name for s in shards] == ["a/part-0.jsonl.gz", "b.jsonl.zst", "c.jsonl"]
    report = validate_dataset(shards, tmp_path / "out")
    assert [r["prompt"][0]["content"] for r in _rows(report)] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
    assert [(s["accepted"], s["rejected"]) for s in report.shards] == [(2, 0), (1, 1), (2, 0)]
    assert report.first_rejects == [{"line": 2, "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
                                     "shard": f"{folder}/b.jsonl.zst"}]
    with pytest.raises(DataError, match=rf"first: line 2 of {folder}/b.jsonl.zst: invalid JSON"):
        check_report(report, 0.0)

    # The digest covers every shard: the same bytes give the same sha256, one changed shard another.
    assert validate_dataset(fetch_dataset(str(folder), tmp_path / "in2"), tmp_path / "out2").sha256 == report.sha256
    (folder / "c.jsonl").write_text(json.dumps({"instruction": "Q3", "output": "changed"}) + "\n")
    assert validate_dataset(fetch_dataset(str(folder), tmp_path / "in3"), tmp_path / "out3").sha256 != report.sha256


def test_an_s3_prefix_reads_like_the_same_folder(s3, bucket, s3_env, tmp_path):
    folder = _shard_folder(tmp_path / "data")
    for path in folder.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"exports/2026-12-03/{path.relative_to(folder).as_posix()}")
    local = json.loads(run_job("validate-data", str(folder), "--max-reject-ratio", "0.5", env={"QLORA_WORK_DIR": str(tmp_path / "w")}).stdout)
    for uri in (f"s3://{bucket}/exports/2026-12-03/", f"s3://{bucket}/exports/2026-12-03"):
        result = run_job("validate-data", uri, "--max-reject-ratio", "0.5", env={**s3_env, "QLORA_WORK_DIR": str(tmp_path / "w")})
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert (summary["sha256"], summary["accepted"], summary["rejected"]) == (local["sha256"], 5, 1)
        assert [s["uri"] for s in summary["shards"]] == [f"s3://{bucket}/exports/2026-12-03/{name}"
                                                         for name in ("a/part-0.jsonl.gz", "b.jsonl.zst", "c.jsonl")]
    # Over the limit, the one-line cause names the shard and the line.
    result = run_job("validate-data", f"s3://{bucket}/exports/2026-12-03/", env={**s3_env, "QLORA_WORK_DIR": str(tmp_path / "w")})
    assert result.returncode == 3
    assert result.stderr.strip().endswith(f"first: line 2 of s3://{bucket}/exports/2026-12-03/b.jsonl.zst: "
                                          "invalid JSON: Expecting property name enclosed in double quotes (column 2)")


def test_weights_repeat_and_sample_a_sources_rows_deterministically(tmp_path):
    from datasets import Dataset

    from job.data import fetch_dataset
    from job.rows import mix_sources

    a = _write(tmp_path / "a.jsonl", [json.dumps({"instruction": f"a{i}", "output": "x"}) for i in range(10)])
    b = _write(tmp_path / "b.jsonl", [json.dumps({"instruction": f"b{i}", "output": "y"}) for i in range(10)])
    weighted = json.dumps([{"uri": str(a), "weight": 2}, {"uri": str(b), "weight": 0.5}])
    report = validate_dataset(fetch_dataset(weighted, tmp_path / "in"), tmp_path / "out")
    assert report.weights == [2.0, 0.5] and [s["weight"] for s in report.shards] == [2.0, 0.5]
    # A weight is part of the data's identity: the same rows mixed otherwise are another dataset.
    plain = validate_dataset(fetch_dataset(json.dumps([str(a), str(b)]), tmp_path / "in2"), tmp_path / "out2")
    assert plain.sha256 != report.sha256 and plain.weights == [1.0, 1.0]

    rows = Dataset.from_list([{"prompt": r["prompt"][0]["content"], "source": r["source"]} for r in _rows(report)])
    mixed = mix_sources(rows, report.weights, seed=7)
    assert "source" not in mixed.column_names
    counts = {}
    for prompt in mixed["prompt"]:
        counts[prompt] = counts.get(prompt, 0) + 1
    assert all(counts[f"a{i}"] == 2 for i in range(10))  # every row of the weight-2 source, twice
    sampled = sorted(p for p in counts if p.startswith("b"))
    assert len(sampled) == 5 and all(counts[p] == 1 for p in sampled)  # half of the weight-0.5 source, once each
    assert mix_sources(rows, report.weights, seed=7)["prompt"] == mixed["prompt"]
    assert sorted(mix_sources(rows, report.weights, seed=8)["prompt"]) != sorted(mixed["prompt"])
    assert mix_sources(rows, [1.0, 1.0], seed=7)["prompt"] == rows["prompt"]  # unweighted: untouched
