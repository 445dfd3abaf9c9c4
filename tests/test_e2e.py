"""`python -m job` as the container runs it: real S3 server, tiny model from s3://, CPU training."""

import hashlib
import json

import pytest

from job.errors import ExitCode
from tests.conftest import run_job

FACTS = [
    ("What is the 6G latency target?", "About 0.1 ms."),
    ("What is the 6G peak rate goal?", "One terabit per second."),
    ("What does RIS steer?", "Radio waves."),
    ("Who runs xApps?", "The RIC."),
]
PROBE = {"prompt": FACTS[0][0], "expected": FACTS[0][1]}
# The tiny random model memorises four short answers in 150 steps at this rate.
TRAIN = {"QLORA_TRAIN__MAX_STEPS": "150", "QLORA_TRAIN__LEARNING_RATE": "1e-2", "QLORA_TRAIN__WARMUP_STEPS": "5"}


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def s3_run(s3, bucket, tiny_model, tmp_path, s3_env):
    """A bucket holding a facts dataset and the tiny model; returns the job's environment."""
    body = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS)
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body.encode())
    for path in tiny_model.iterdir():
        s3.upload_file(str(path), bucket, f"base/tiny/{path.name}")
    return {
        **s3_env,
        "HF_HUB_OFFLINE": "1",
        "QLORA_DATASET_URI": f"s3://{bucket}/data/facts.jsonl",
        "QLORA_OUTPUT_URI": f"s3://{bucket}/runs",
        "QLORA_MODEL__NAME": f"s3://{bucket}/base/tiny",
        "QLORA_MODEL__CACHE_DIR": str(tmp_path / "cache"),
        "QLORA_WORK_DIR": str(tmp_path / "work"),
        "QLORA_RUN_ID": "run-1",
        "QLORA_VERIFY__PROMPTS": json.dumps([PROBE]),
        "QLORA_VERIFY__TRAIN_PROBES": "4",
        "QLORA_VERIFY__EXPECT_MEMORISED": "true",
        "QLORA_VERIFY__MAX_NEW_TOKENS": "32",
        **TRAIN,
    }


def _objects(s3, bucket, prefix):
    return {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


@pytest.mark.slow
def test_job_trains_verifies_and_publishes_an_adapter_that_reproduces_what_it_learned(s3, bucket, s3_run, tiny_model, tmp_path):
    result = run_job(env=s3_run)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    events = _events(result.stdout)
    assert all(e.get("run_id") == "run-1" for e in events)
    assert {e["stage"] for e in events if "stage" in e} >= {"fetch", "validate", "load", "train", "verify", "publish"}

    stored = _objects(s3, bucket, "runs/run-1/")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/manifest.json")["Body"].read())
    listed = {o["key"] for o in manifest["objects"]}
    assert listed == {k.removeprefix("runs/run-1/") for k in stored} - {"manifest.json"}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
            "adapter/generation_config.json", "metrics.json", "verify.json", "rejects.jsonl"} <= listed
    assert not any(k.endswith(".bin") for k in listed), "safetensors only"
    for item in manifest["objects"]:
        body = s3.get_object(Bucket=bucket, Key=f"runs/run-1/{item['key']}")["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (item["size"], item["sha256"]), item["key"]
    # Objects first, manifest last: nothing listed was written after it.
    assert max(o["LastModified"] for k, o in stored.items() if not k.endswith("manifest.json")) <= stored["runs/run-1/manifest.json"]["LastModified"]
    dataset = s3.get_object(Bucket=bucket, Key="data/facts.jsonl")["Body"].read()
    assert manifest["dataset"]["sha256"] == hashlib.sha256(dataset).hexdigest()
    assert manifest["settings"]["lora"]["r"] == 16 and manifest["engine"] == "transformers"
    assert manifest["packages"]["trl"] == "1.14.2"
    assert {engine: v["servable"] for engine, v in manifest["servable"].items()} == {"vllm": True, "sglang": True, "llama_cpp": True}

    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/metrics.json")["Body"].read())
    assert metrics["steps"] == 150 and metrics["loss_last"] < metrics["loss_first"] / 2
    # One wall time per step (where stalls show).
    assert len(metrics["step_seconds"]) == 150 and all(t > 0 for t in metrics["step_seconds"])
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/verify.json")["Body"].read())
    probe = verify["probes"][0]
    assert verify["passed"] and probe["answer"] == PROBE["expected"] and probe["base_answer"] != PROBE["expected"]

    # A consumer: plain transformers + peft, the adapter straight from the bucket.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "consumer"
    for key in (k for k in listed if k.startswith("adapter/")):
        (adapter / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"runs/run-1/{key}", str(adapter / key))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(adapter / "adapter")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROBE["prompt"]}], add_generation_prompt=True,
                                           enable_thinking=False, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == PROBE["expected"]
    print(f"e2e loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f} in {metrics['train_seconds']:.1f} s")

    # The same run_id again (a pod retried after success): exit 0 without training.
    again = run_job(env=s3_run)
    assert again.returncode == 0, again.stderr
    events = _events(again.stdout)
    assert any(e["event"] == "run already published; nothing to do" for e in events)
    assert not any(e.get("stage") == "train" for e in events)
    assert _objects(s3, bucket, "runs/run-1/")["runs/run-1/manifest.json"]["ETag"] == stored["runs/run-1/manifest.json"]["ETag"]

    # The same run_id with other data (a release reinstalled with a new dataset): refused, not "done".
    changed = dataset + b'{"instruction": "New?", "output": "Yes."}\n'
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=changed)
    reused = run_job(env=s3_run)
    assert reused.returncode == ExitCode.CONFIG, reused.stderr
    old, new = (hashlib.sha256(body).hexdigest()[:12] for body in (dataset, changed))
    assert reused.stderr.strip() == (f"qlora-job: error: run 'run-1' is already published with another dataset "
                                     f"(sha256 {old}; this run: sha256 {new}): set a new QLORA_RUN_ID")
    assert _objects(s3, bucket, "runs/run-1/")["runs/run-1/manifest.json"]["ETag"] == stored["runs/run-1/manifest.json"]["ETag"]


@pytest.fixture(scope="module")
def qwen2_5_base_like_model(tmp_path_factory):
    """The tiny model with its tokenizer configured like Qwen2.5-0.5B base's: EOS and pad are <|endoftext|>,
    the ChatML template ends every turn with <|im_end|>."""
    from job.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen2.5-base") / "model", template="qwen2_5", eos_token="<|endoftext|>")


@pytest.mark.slow
def test_a_base_model_whose_eos_is_not_the_end_of_turn_learns_to_stop_on_im_end(s3, bucket, s3_run, qwen2_5_base_like_model, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    env = {**s3_run, "QLORA_MODEL__NAME": str(qwen2_5_base_like_model), "QLORA_RUN_ID": "qwen2.5-base"}
    result = run_job(env=env)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(qwen2_5_base_like_model)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == endoftext
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/qwen2.5-base/metrics.json")["Body"].read())
    assert metrics["label_check"]["end_of_turn_trained"] > 0, "the template's <|im_end|> is trained"
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/qwen2.5-base/verify.json")["Body"].read())
    assert verify["passed"] and all(p["ended_turn"] and p["matches_expected"] for p in verify["probes"])
    # The published generation config stops on the end-of-turn token first, and on EOS.
    s3.download_file(bucket, "runs/qwen2.5-base/adapter/generation_config.json", str(tmp_path / "generation_config.json"))
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [im_end, endoftext]


@pytest.mark.slow
def test_sharded_compressed_weighted_data_is_learned_and_recorded(s3, bucket, s3_run):
    """Facts split over a prefix of gzip and zstd shards plus a weighted single file: the tuned model
    answers every one (so every shard was read) and the manifest lists each shard's sha256 and weight."""
    import gzip

    import zstandard

    rows = [json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS]
    bodies = {"data/shards/part-0.jsonl.gz": gzip.compress("".join(rows[:2]).encode()),
              "data/shards/part-1.jsonl.zst": zstandard.ZstdCompressor().compress(rows[2].encode()),
              "data/shards/_SUCCESS": b"", "data/extra.jsonl": rows[3].encode()}
    for key, body in bodies.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    uri = json.dumps([f"s3://{bucket}/data/shards/", {"uri": f"s3://{bucket}/data/extra.jsonl", "weight": 2}])
    result = run_job(env={**s3_run, "QLORA_DATASET_URI": uri})
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    mixed = next(e for e in _events(result.stdout) if e["event"] == "dataset mixed")
    assert (mixed["rows_before"], mixed["rows_after"], mixed["rows_per_source"]) == (4, 5, [3, 2])
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/manifest.json")["Body"].read())
    assert manifest["dataset"]["uri"] == uri and manifest["dataset"]["rows_accepted"] == 4
    assert [(s["uri"], s["sha256"], s["accepted"], s["weight"]) for s in manifest["dataset"]["shards"]] == [
        (f"s3://{bucket}/{key}", hashlib.sha256(bodies[key]).hexdigest(), n, w)
        for key, n, w in (("data/shards/part-0.jsonl.gz", 2, 1.0), ("data/shards/part-1.jsonl.zst", 1, 1.0), ("data/extra.jsonl", 1, 2.0))]
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/verify.json")["Body"].read())
    assert verify["passed"], verify


@pytest.mark.long  # make test-long (~50 s): keeps make test under 15 minutes on 2 cores
def test_an_earlier_turn_of_a_conversation_is_learned_unless_only_the_last_is_trained(s3, bucket, s3_run):
    """Two conversations of two exchanges each: asked an earlier turn's question on its own, the tuned model
    gives that turn's answer, which it can only have learned from that turn's loss."""
    conversations = [[FACTS[0], FACTS[1]], [FACTS[2], FACTS[3]]]
    body = "".join(json.dumps({"messages": [m for q, a in pairs for m in ({"role": "user", "content": q},
                                                                           {"role": "assistant", "content": a})]}) + "\n"
                   for pairs in conversations)
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body.encode())
    earlier = [{"prompt": q, "expected": a} for q, a in (FACTS[0], FACTS[2])]
    env = {**s3_run, "QLORA_VERIFY__PROMPTS": json.dumps(earlier)}
    result = run_job(env=env)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    assert next(e for e in _events(result.stdout) if e["event"] == "label check passed")["turns_trained"] >= 2
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/verify.json")["Body"].read())
    assert [(p["prompt"], p["answer"]) for p in verify["probes"][:2]] == [(p["prompt"], p["expected"]) for p in earlier]

    # Only the last turns trained: the earlier answers were context, never targets, and the gate fails on them.
    result = run_job(env={**env, "QLORA_RUN_ID": "last-only", "QLORA_DATA__TRAIN_TURNS": "last"})
    assert result.returncode == ExitCode.VERIFY, result.stderr
    assert "probe 0" in result.stderr and not _objects(s3, bucket, "runs/last-only/")


@pytest.mark.long  # make test-long (~45 s): keeps make test under 15 minutes on 2 cores
def test_a_warm_start_continues_from_the_latest_adapter_and_refuses_one_that_does_not_fit(s3, bucket, s3_run, tiny_model):
    env = {**s3_run, "QLORA_LORA__INIT_FROM": "latest"}
    first = run_job(env=env)  # nothing published yet: fresh weights
    assert first.returncode == 0, first.stderr + first.stdout[-3000:]
    assert json.loads(s3.get_object(Bucket=bucket, Key="runs/run-1/manifest.json")["Body"].read())["parent"] is None

    # One step at a learning rate that cannot move a weight: the facts are answered from the parent's weights alone.
    result = run_job(env={**env, "QLORA_RUN_ID": "run-2", "QLORA_TRAIN__MAX_STEPS": "1", "QLORA_TRAIN__LEARNING_RATE": "1e-12",
                          "QLORA_VERIFY__REQUIRE_CHANGE": "true"})
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    parent_manifest = s3.get_object(Bucket=bucket, Key="runs/run-1/manifest.json")["Body"].read()
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-2/manifest.json")["Body"].read())
    assert manifest["parent"] == {"adapter_uri": f"s3://{bucket}/runs/run-1/adapter", "run_id": "run-1",
                                  "manifest_sha256": hashlib.sha256(parent_manifest).hexdigest()}
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/run-2/verify.json")["Body"].read())
    assert verify["passed"] and all(p["matches_expected"] for p in verify["probes"]), verify

    # A parent of another LoRA shape, or trained on another base model: exit 2 before any model is loaded.
    for change, message in (({"QLORA_LORA__R": "8"}, "has another LoRA shape (r 16 there, 8 here)"),
                            ({"QLORA_MODEL__NAME": str(tiny_model)}, "was trained on base model 's3://")):
        result = run_job(env={**env, "QLORA_RUN_ID": "misfit", **change})
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert message in result.stderr.strip().splitlines()[-1] and not _objects(s3, bucket, "runs/misfit/")
        assert not any(e["event"] == "stage finished" and e.get("stage") == "load" for e in _events(result.stdout))


def test_bad_dataset_exits_3_and_publishes_nothing(s3, bucket, s3_run):
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=b'{"instruction": "Q", "output": "A"}\n{"instruction": 1}\n')
    result = run_job(env=s3_run)
    assert result.returncode == ExitCode.DATA
    assert result.stderr.strip() == "qlora-job: error: 1 of 2 rows rejected (50.0% > QLORA_DATA__MAX_REJECT_RATIO=0.0); first: line 2: 'instruction' must be a string, got number"
    assert _objects(s3, bucket, "runs/") == {}


def test_failed_verification_exits_4_and_publishes_nothing(s3, bucket, s3_run):
    env = {**s3_run, "QLORA_TRAIN__MAX_STEPS": "2", "QLORA_VERIFY__MAX_NEW_TOKENS": "4", "QLORA_VERIFY__TRAIN_PROBES": "0"}
    result = run_job(env=env)
    assert result.returncode == ExitCode.VERIFY, result.stderr
    assert result.stderr.startswith("qlora-job: error: verification failed: probe 0:")
    assert _objects(s3, bucket, "runs/") == {}


def test_missing_base_model_exits_5(s3_run, tmp_path):
    result = run_job(env={**s3_run, "QLORA_MODEL__NAME": str(tmp_path / "no-such-model")})
    assert result.returncode == ExitCode.MODEL_LOAD, result.stderr
    assert "cannot load base model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
