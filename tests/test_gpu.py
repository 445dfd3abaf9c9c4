"""The Unsloth path on a real GPU (run there with `pytest -m gpu`; deselected elsewhere)."""

import json

import pytest

from job.errors import ExitCode
from tests.conftest import run_job
from tests.test_e2e import FACTS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def qwen3_shaped_model(tmp_path_factory):
    from job.tiny import QWEN3_0_6B, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3") / "model", shape=QWEN3_0_6B)


@pytest.mark.parametrize("recipe", ["fast", "seed"])
def test_unsloth_qlora_job_end_to_end(recipe, s3, bucket, s3_env, qwen3_shaped_model, tmp_path):
    body = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS)
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body.encode())
    model = str(qwen3_shaped_model)
    if recipe == "fast":  # the s3:// model path once; 1.2 GB through moto costs minutes
        for path in qwen3_shaped_model.iterdir():
            s3.upload_file(str(path), bucket, f"base/qwen3/{path.name}")
        model = f"s3://{bucket}/base/qwen3"
    env = {
        **s3_env, "HF_HUB_OFFLINE": "1",
        "QLORA_ENGINE": "unsloth", "QLORA_TRAIN__RECIPE": recipe,
        "QLORA_DATASET_URI": f"s3://{bucket}/data/facts.jsonl", "QLORA_OUTPUT_URI": f"s3://{bucket}/runs",
        "QLORA_MODEL__NAME": model, "QLORA_MODEL__CACHE_DIR": str(tmp_path / "cache"),
        "QLORA_WORK_DIR": str(tmp_path / "work"), "QLORA_RUN_ID": f"gpu-{recipe}",
        "QLORA_TRAIN__MAX_STEPS": "80", "QLORA_TRAIN__LEARNING_RATE": "2e-3",
        "QLORA_VERIFY__TRAIN_PROBES": "4", "QLORA_VERIFY__MAX_NEW_TOKENS": "32",
    }
    result = run_job(env=env, timeout=900)
    assert result.returncode == ExitCode.OK, result.stderr + result.stdout[-4000:]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/gpu-{recipe}/manifest.json")["Body"].read())
    metrics = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/gpu-{recipe}/metrics.json")["Body"].read())
    verify = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/gpu-{recipe}/verify.json")["Body"].read())
    assert manifest["engine"] == "unsloth" and "unsloth" in manifest["packages"]
    assert metrics["peak_gpu_memory_gib"] > 0 and metrics["loss_last"] < metrics["loss_first"]
    assert metrics["batch_plan"]["gradient_accumulation_steps"] == (4 if recipe == "seed" else 1)
    assert verify["passed"]
    exact = sum(p["answer"] == a for p, (_, a) in zip(verify["probes"], FACTS, strict=True))
    print(f"{recipe}: loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}, {exact}/4 answers exact, "
          f"peak {metrics['peak_gpu_memory_gib']} GiB, {metrics['steady_tokens_per_second']} tokens/s")


def test_unsloth_merged_export_reloads_with_plain_transformers(qwen3_shaped_model, tmp_path):
    """Unsloth's merged 16-bit save from the 4-bit run, through the same gate; local folders, not
    S3, because 1.2 GB through the loopback S3 server costs minutes."""
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    env = {
        "HF_HUB_OFFLINE": "1", "QLORA_ENGINE": "unsloth", "QLORA_DATASET_URI": str(data), "QLORA_OUTPUT_URI": str(tmp_path / "out"),
        "QLORA_MODEL__NAME": str(qwen3_shaped_model), "QLORA_WORK_DIR": str(tmp_path / "work"), "QLORA_RUN_ID": "gpu-merged",
        "QLORA_TRAIN__MAX_STEPS": "80", "QLORA_TRAIN__LEARNING_RATE": "2e-3", "QLORA_VERIFY__TRAIN_PROBES": "4",
        "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "QLORA_EXPORT__MERGED": "true",
        "QLORA_METRICS__LOSS_CURVE_PNG": "false",  # matplotlib is not among the wheels carried to the GPU machine
    }
    result = run_job(env=env, timeout=900)
    assert result.returncode == ExitCode.OK, result.stderr + result.stdout[-4000:]
    run = tmp_path / "out" / "gpu-merged"
    merged = json.loads((run / "verify-merged.json").read_text())
    adapter = json.loads((run / "verify.json").read_text())
    assert merged["passed"] and (run / "merged" / "config.json").exists()
    same = sum(m["answer"] == a["answer"] for m, a in zip(merged["probes"], adapter["probes"], strict=True))
    exact = sum(p["answer"] == a for p, (_, a) in zip(merged["probes"], FACTS, strict=True))
    size = sum(p.stat().st_size for p in (run / "merged").iterdir())
    print(f"merged: {exact}/4 answers exact, {same}/4 equal to the 4-bit adapter's, {size / 2**30:.2f} GiB on disk")


def test_unsloth_reload_of_a_missing_base_model_is_exit_5s_error_not_an_internal_one(tmp_path):
    """verify's fresh reload goes through the same load mapping as training (it had none: exit 1, retried)."""
    from job import engine
    from job.errors import ModelLoadError
    from job.settings import Settings

    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"), engine="unsloth")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="cannot load base model"):
        engine.load_for_inference(settings, "unsloth", missing, tmp_path / "adapter")


def test_unsloth_merge_loads_with_the_hub_arguments(qwen3_shaped_model, tmp_path, monkeypatch):
    """Unsloth's merged save loads base + adapter through the one Unsloth load: token, revision, no remote code."""
    from job import engine
    from job.settings import Settings

    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"), engine="unsloth", hf_token="hf_gated_model_token")
    model, tokenizer = engine.load_for_training(settings, "unsloth", str(qwen3_shaped_model))  # an untrained Unsloth adapter
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    del model
    engine.free_memory()
    from unsloth import FastLanguageModel

    calls, original = [], FastLanguageModel.from_pretrained

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", recorded)
    engine.merge_adapter(settings, "unsloth", str(qwen3_shaped_model), tmp_path / "adapter", tmp_path / "merged")
    assert calls and calls[0]["token"] == "hf_gated_model_token" and calls[0]["trust_remote_code"] is False
    assert (tmp_path / "merged" / "config.json").exists()


def test_unsloth_stops_on_the_templates_end_of_turn_when_eos_is_endoftext(tmp_path):
    """A Qwen3-0.6B-shaped model with its tokenizer configured like Qwen2.5-0.5B base's (EOS and pad
    <|endoftext|>, ChatML turns ending with <|im_end|>), through Unsloth, verify and the merged export."""
    from transformers import AutoTokenizer, GenerationConfig

    from job.tiny import QWEN3_0_6B, make_tiny_model

    model = make_tiny_model(tmp_path / "model", shape=QWEN3_0_6B, template="qwen2_5", eos_token="<|endoftext|>")
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    env = {
        "HF_HUB_OFFLINE": "1", "QLORA_ENGINE": "unsloth", "QLORA_DATASET_URI": str(data), "QLORA_OUTPUT_URI": str(tmp_path / "out"),
        "QLORA_MODEL__NAME": str(model), "QLORA_WORK_DIR": str(tmp_path / "work"), "QLORA_RUN_ID": "gpu-stop",
        "QLORA_TRAIN__MAX_STEPS": "80", "QLORA_TRAIN__LEARNING_RATE": "2e-3", "QLORA_VERIFY__TRAIN_PROBES": "4",
        "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "QLORA_VERIFY__EXPECT_MEMORISED": "true", "QLORA_EXPORT__MERGED": "true",
        "QLORA_METRICS__LOSS_CURVE_PNG": "false",
    }
    result = run_job(env=env, timeout=900)
    assert result.returncode == ExitCode.OK, result.stderr + result.stdout[-4000:]
    run = tmp_path / "out" / "gpu-stop"
    tokenizer = AutoTokenizer.from_pretrained(model)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["label_check"]["end_of_turn_trained"] > 0
    for report in ("verify.json", "verify-merged.json"):
        probes = json.loads((run / report).read_text())["probes"]
        assert all(p["ended_turn"] and p["matches_expected"] for p in probes), (report, probes)
    assert GenerationConfig.from_pretrained(run / "adapter").eos_token_id == stops
    assert GenerationConfig.from_pretrained(run / "merged").eos_token_id == stops
    print(f"stop: end-of-turn trained {metrics['label_check']['end_of_turn_trained']}x in the first batch, 4/4 ended on <|im_end|>")


def test_unsloth_eval_during_training_answer_metrics_and_a_champion_loaded_beside_the_adapter(s3, bucket, s3_env, qwen3_shaped_model,
                                                                                               tmp_path):
    """#18 on the unsloth engine: evaluations during training with early stopping, the held-out answers batched
    through Unsloth's generation, and a second run that loads the first run's adapter beside its own (peft
    load_adapter on Unsloth's model) and decides promotion from the scores."""
    styled = [{"messages": [{"role": "system", "content": f"Style {i}."}, {"role": "user", "content": q},
                            {"role": "assistant", "content": a}]} for i in range(4) for q, a in FACTS]
    for key, rows in (("sixteen", styled), ("two", [r for r in styled if r["messages"][1]["content"] in {q for q, _ in FACTS[:2]}]),
                      ("four", styled[::5])):
        s3.put_object(Bucket=bucket, Key=f"data/{key}.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    env = {
        **s3_env, "HF_HUB_OFFLINE": "1", "QLORA_ENGINE": "unsloth", "QLORA_OUTPUT_URI": f"s3://{bucket}/runs",
        "QLORA_MODEL__NAME": str(qwen3_shaped_model), "QLORA_WORK_DIR": str(tmp_path / "work"),
        "QLORA_TRAIN__MAX_STEPS": "80", "QLORA_TRAIN__LEARNING_RATE": "2e-3", "QLORA_VERIFY__TRAIN_PROBES": "2",
        "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "QLORA_EVAL__STRATEGY": "steps", "QLORA_EVAL__STEPS": "20",
        "QLORA_EVAL__EARLY_STOPPING_PATIENCE": "2", "QLORA_PROMOTION__FAIL_WHEN_NOT_PROMOTED": "true",
    }
    champion = run_job(env={**env, "QLORA_RUN_ID": "gpu-champ", "QLORA_DATASET_URI": f"s3://{bucket}/data/sixteen.jsonl",
                            "QLORA_EVAL__FRACTION": "0.25"}, timeout=900)
    assert champion.returncode == ExitCode.OK, champion.stderr + champion.stdout[-4000:]
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/gpu-champ/metrics.json")["Body"].read())
    assert metrics["engine"] == "unsloth" and metrics["evaluation"]["prompts"] == 4 and metrics["best"] is not None
    assert [p["step"] for p in metrics["eval_curve"]][:2] == [0, 20] and metrics["eval_loss_after"] == metrics["best"]["eval_loss"]
    print("gpu-champ:", metrics["steps"], "steps, stopped early:", metrics["stopped_early"], "best:", metrics["best"],
          "eval curve:", [(p["step"], round(p["eval_loss"], 3)) for p in metrics["eval_curve"]],
          "answers:", {k: metrics["evaluation"][k] for k in ("tuned", "base", "seconds")})

    weak = run_job(env={**env, "QLORA_RUN_ID": "gpu-weak", "QLORA_DATASET_URI": f"s3://{bucket}/data/two.jsonl",
                        "QLORA_EVAL__DATASET_URI": f"s3://{bucket}/data/four.jsonl"}, timeout=900)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/gpu-weak/manifest.json")["Body"].read())
    evaluation, promotion = manifest["evaluation"], manifest["promotion"]
    print("gpu-weak:", {k: evaluation[k] for k in ("tuned", "base", "champion", "seconds")}, promotion)
    assert evaluation["champion_run_id"] == "gpu-champ" and evaluation["champion"] is not None
    assert promotion["promoted"] == (evaluation["tuned"]["chrf"] >= evaluation["champion"]["chrf"] - 1.0)
    assert weak.returncode == (ExitCode.OK if promotion["promoted"] else ExitCode.NOT_PROMOTED), weak.stderr
