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
