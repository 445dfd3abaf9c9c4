"""Operations: periodic retraining (skip, latest.json, retention), Pushgateway and report_to,
the loss-curve PNG, held-out evaluation with its gate, merged and GGUF exports, multi-node
rendezvous. Real S3 (moto server), real converter (llama.cpp's script), CPU training."""

import hashlib
import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from job.errors import ExitCode
from tests.conftest import run_job
from tests.test_e2e import FACTS, PROBE, TRAIN, _events, _objects

pytestmark = pytest.mark.slow
QUICK = {**TRAIN, "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "QLORA_VERIFY__TRAIN_PROBES": "2"}
LLAMA_CPP = os.environ.get("LLAMA_CPP", str(Path(__file__).parents[1] / ".tools" / "llama.cpp"))  # `make tools`


@pytest.fixture
def job_env(s3, bucket, tiny_model, tmp_path, s3_env):
    body = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS)
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body.encode())
    return {**s3_env, "HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": f"s3://{bucket}/data/facts.jsonl",
            "QLORA_OUTPUT_URI": f"s3://{bucket}/runs", "QLORA_MODEL__NAME": str(tiny_model),
            "QLORA_WORK_DIR": str(tmp_path / "work"), **QUICK}


def _json(s3, bucket, key):
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _run_ids(s3, bucket):
    return sorted({k.split("/")[1] for k in _objects(s3, bucket, "runs/") if k.count("/") >= 2})


@pytest.mark.long  # make test-long (~95 s): keeps make test under 15 minutes on 2 cores
def test_retraining_skips_unchanged_moves_latest_and_keeps_the_newest_runs(s3, bucket, job_env, tiny_model, tmp_path):
    base = tmp_path / "base"  # a base model folder this test may change in place
    shutil.copytree(tiny_model, base)
    env = {**job_env, "QLORA_RETRAIN__KEEP_RUNS": "2", "QLORA_MODEL__NAME": str(base)}
    assert run_job(env={**env, "QLORA_RUN_ID": "day-1"}).returncode == 0
    latest = _json(s3, bucket, "runs/latest.json")
    manifest = _json(s3, bucket, "runs/day-1/manifest.json")
    assert latest["run_id"] == "day-1" and latest["dataset_sha256"] == manifest["dataset"]["sha256"]
    assert latest["settings_sha256"] == manifest["settings_sha256"] and latest["published_at"] == manifest["published_at"]

    # A pod that published but could not move latest.json: its retry finds the manifest and moves it.
    s3.delete_object(Bucket=bucket, Key="runs/latest.json")
    assert run_job(env={**env, "QLORA_RUN_ID": "day-1"}).returncode == 0
    assert _json(s3, bucket, "runs/latest.json") == latest

    # Same data, settings and base model: exit 0 without training, nothing written, latest unchanged.
    same = run_job(env={**env, "QLORA_RUN_ID": "day-2"})
    assert same.returncode == 0, same.stderr
    skipped = [e for e in _events(same.stdout) if e["event"].startswith("unchanged since the latest")]
    assert skipped and skipped[0]["latest_run"] == "day-1"
    assert not any(e["event"] == "model loaded" for e in _events(same.stdout))
    assert "day-2" not in _run_ids(s3, bucket) and _json(s3, bucket, "runs/latest.json")["run_id"] == "day-1"

    # The base model's weights replaced in place (same names, same sizes): that is a change, it retrains.
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    save_file({name: tensor * 1.01 for name, tensor in weights.items()}, base / "model.safetensors", metadata={"format": "pt"})
    changed = run_job(env={**env, "QLORA_RUN_ID": "day-2b"})
    assert changed.returncode == 0, changed.stderr
    assert any(e["event"] == "model loaded" for e in _events(changed.stdout))
    fingerprints = [_json(s3, bucket, f"runs/{r}/manifest.json")["base_model"]["fingerprint"] for r in ("day-1", "day-2b")]
    assert fingerprints[0] != fingerprints[1] and _json(s3, bucket, "runs/latest.json")["base_model"]["fingerprint"] == fingerprints[1]

    # A changed setting retrains; so does changed data. A run left without a manifest is never deleted.
    s3.put_object(Bucket=bucket, Key="runs/crashed/adapter/partial.bin", Body=b"x")
    assert run_job(env={**env, "QLORA_RUN_ID": "day-3", "QLORA_LORA__R": "8"}).returncode == 0
    body = s3.get_object(Bucket=bucket, Key="data/facts.jsonl")["Body"].read() + b'{"instruction": "New?", "output": "Yes."}\n'
    s3.put_object(Bucket=bucket, Key="data/facts.jsonl", Body=body)
    assert run_job(env={**env, "QLORA_RUN_ID": "day-4", "QLORA_LORA__R": "8"}).returncode == 0
    assert _json(s3, bucket, "runs/latest.json")["run_id"] == "day-4"
    assert _run_ids(s3, bucket) == ["crashed", "day-3", "day-4"]  # keep_runs=2: day-1 deleted


class PushRecorder(http.server.ThreadingHTTPServer):
    """Records what a Pushgateway would receive (method, path, body) and answers 200."""

    def __init__(self):
        self.pushes: list[tuple[str, str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(handler):  # noqa: N805
                length = int(handler.headers.get("Content-Length", 0))
                self.pushes.append((handler.command, handler.path, handler.rfile.read(length).decode()))
                handler.send_response(200)
                handler.end_headers()

            do_PUT = do_POST = _record

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _gauges(body: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples}


def _tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalars from TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.mark.long  # make test-long
def test_pushgateway_tensorboard_and_loss_curve_png(s3, bucket, job_env, tmp_path):
    gateway = PushRecorder()
    env = {**job_env, "QLORA_RUN_ID": "observed", "QLORA_METRICS__PUSHGATEWAY_URL": f"http://127.0.0.1:{gateway.server_port}",
           "QLORA_METRICS__PUSH_EVERY_SECONDS": "0.001", "QLORA_METRICS__REPORT_TO": '["tensorboard"]',
           "QLORA_EVAL__FRACTION": "0.25", "QLORA_EVAL__STRATEGY": "steps", "QLORA_EVAL__STEPS": "50"}
    result = run_job(env=env)
    gateway.shutdown()
    assert result.returncode == 0, result.stderr
    paths = {path for _, path, _ in gateway.pushes}
    assert paths == {"/metrics/job/qlora-job/run_id/observed"}
    progress = [_gauges(body) for _, _, body in gateway.pushes]
    assert any(0 < g.get("qlora_step", 0) < 150 for g in progress), "no push while training"
    final = progress[-1]
    assert (final["qlora_finished"], final["qlora_exit_code"], final["qlora_step"], final["qlora_max_steps"]) == (1, 0, 150, 150)
    first = next(g for g in progress if g.get("qlora_step"))  # pushes before training carry the eval loss only
    assert final["qlora_loss"] < first["qlora_loss"] and final["qlora_duration_seconds"] > 0
    evaluation = _json(s3, bucket, "runs/observed/metrics.json")["evaluation"]  # one held-out prompt, no champion
    assert (final["qlora_answer_chrf"], final["qlora_base_answer_exact_match"], final["qlora_promoted"]) == (
        evaluation["tuned"]["chrf"], evaluation["base"]["exact_match"], 1)
    assert "qlora_champion_answer_chrf" not in final, "no champion: nothing measured, so no gauge (not a 0)"
    pushed = {g["qlora_eval_loss"] for g in progress if g.get("qlora_eval_loss")}  # before, at steps 50, 100, 150
    evaluated = {e["eval_loss"] for e in _json(s3, bucket, "runs/observed/metrics.json")["eval_curve"]}
    assert len(evaluated) == 4 and len(pushed) >= 3 and pushed <= evaluated, (pushed, evaluated)

    manifest = _json(s3, bucket, "runs/observed/manifest.json")
    objects = {o["key"]: o for o in manifest["objects"]}
    png = s3.get_object(Bucket=bucket, Key="runs/observed/loss_curve.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (700, 400)
    import hashlib

    assert objects["loss_curve.png"]["sha256"] == hashlib.sha256(png).hexdigest()

    # report_to=["tensorboard"]: the Trainer's own event files, published with the run.
    events = [k for k in objects if k.startswith("tensorboard/")]
    assert events
    for key in events:
        (tmp_path / "tb" / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"runs/observed/{key}", str(tmp_path / "tb" / key))
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert len(scalars["train/loss"]) == 150 and scalars["train/loss"][-1] < scalars["train/loss"][0]


@pytest.mark.long  # make test-long
def test_unreachable_pushgateway_is_a_warning_and_missing_integration_is_exit_2(s3, bucket, job_env):
    result = run_job(env={**job_env, "QLORA_RUN_ID": "no-gateway", "QLORA_METRICS__PUSHGATEWAY_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert any(e["event"] == "pushgateway push failed" for e in _events(result.stdout))

    result = run_job(env={**job_env, "QLORA_RUN_ID": "wandb", "QLORA_METRICS__REPORT_TO": '["wandb"]'})
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr.strip().splitlines()[-1].startswith("qlora-job: error: QLORA_METRICS__REPORT_TO: wandb is not installed")


@pytest.mark.long  # make test-long (~65 s): keeps make test under 15 minutes on 2 cores
def test_held_out_evaluation_and_its_gate(s3, bucket, job_env, tmp_path):
    # 16 rows, each fact four times with different system prompts: 4 held out, 12 trained on.
    body = "".join(json.dumps({"messages": [{"role": "system", "content": f"Style {i}."}, {"role": "user", "content": q},
                                            {"role": "assistant", "content": a}]}) + "\n" for i in range(4) for q, a in FACTS)
    s3.put_object(Bucket=bucket, Key="data/sixteen.jsonl", Body=body.encode())
    env = {**job_env, "QLORA_DATASET_URI": f"s3://{bucket}/data/sixteen.jsonl", "QLORA_EVAL__FRACTION": "0.25",
           "QLORA_EVAL__REQUIRE_IMPROVEMENT": "true"}
    result = run_job(env={**env, "QLORA_RUN_ID": "eval-ok"})
    assert result.returncode == 0, result.stderr
    metrics = _json(s3, bucket, "runs/eval-ok/metrics.json")
    assert metrics["eval_rows"] == 4 and metrics["rows"] == 12
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]
    manifest = _json(s3, bucket, "runs/eval-ok/manifest.json")
    assert manifest["loss"]["eval_after"] == metrics["eval_loss_after"]
    # The held-out rows (facts under another system prompt) answered by the tuned adapter, not by the base model.
    evaluation = manifest["evaluation"]
    assert evaluation == {k: v for k, v in metrics["evaluation"].items() if k != "promotion"}
    assert evaluation["prompts"] == 4 and evaluation["tuned"]["exact_match"] >= 75 and evaluation["base"]["exact_match"] == 0
    assert evaluation["tuned"]["chrf"] > evaluation["base"]["chrf"] + 50, evaluation
    assert manifest["promotion"]["promoted"] and _json(s3, bucket, "runs/latest.json")["run_id"] == "eval-ok"
    answers = _json(s3, bucket, "runs/eval-ok/evaluation.json")["answers"]
    assert sum(a["tuned_answer"] == a["reference"] for a in answers) == round(evaluation["tuned"]["exact_match"] * 4 / 100)

    # A challenger that learnt two of the four facts, scored on all four against the champion eval-ok in its own
    # process: published, not promoted, exit 7 when asked; latest.json stays; its retried pod does not move it either.
    two = "".join(json.dumps({"messages": [{"role": "system", "content": f"Style {i}."}, {"role": "user", "content": q},
                                           {"role": "assistant", "content": a}]}) + "\n" for i in range(4) for q, a in FACTS[:2])
    s3.put_object(Bucket=bucket, Key="data/two.jsonl", Body=two.encode())
    four = "".join(json.dumps({"messages": [{"role": "system", "content": f"Style {i}."}, {"role": "user", "content": q},
                                            {"role": "assistant", "content": a}]}) + "\n" for i, (q, a) in enumerate(FACTS))
    s3.put_object(Bucket=bucket, Key="data/four.jsonl", Body=four.encode())
    weak = {**job_env, "QLORA_RUN_ID": "eval-weak", "QLORA_DATASET_URI": f"s3://{bucket}/data/two.jsonl",
            "QLORA_EVAL__DATASET_URI": f"s3://{bucket}/data/four.jsonl", "QLORA_PROMOTION__FAIL_WHEN_NOT_PROMOTED": "true"}
    result = run_job(env=weak)
    assert result.returncode == ExitCode.NOT_PROMOTED, json.dumps([e for e in _events(result.stdout) if "answer" in e["event"] or "champion" in e["event"]])
    assert "published but not promoted: chrf" in result.stderr.strip().splitlines()[-1]
    manifest = _json(s3, bucket, "runs/eval-weak/manifest.json")
    promotion, evaluation = manifest["promotion"], manifest["evaluation"]
    assert promotion["promoted"] is False and promotion["champion_run_id"] == "eval-ok"
    assert evaluation["champion"]["exact_match"] > evaluation["tuned"]["exact_match"] and promotion["champion"] - promotion["challenger"] > 1
    assert _json(s3, bucket, "runs/latest.json")["run_id"] == "eval-ok"
    assert run_job(env={**weak, "QLORA_PROMOTION__FAIL_WHEN_NOT_PROMOTED": "false"}).returncode == 0  # already published
    assert _json(s3, bucket, "runs/latest.json")["run_id"] == "eval-ok"

    # A learning rate too small to move the weights: eval loss does not improve -> exit 4, nothing published.
    result = run_job(env={**env, "QLORA_RUN_ID": "eval-flat", "QLORA_TRAIN__LEARNING_RATE": "1e-12", "QLORA_TRAIN__MAX_STEPS": "10",
                          "QLORA_VERIFY__REQUIRE_CHANGE": "false"})
    assert result.returncode == ExitCode.VERIFY, result.stderr
    assert "eval loss did not improve" in result.stderr.strip().splitlines()[-1]
    assert not _objects(s3, bucket, "runs/eval-flat/")

    result = run_job(env={**job_env, "QLORA_RUN_ID": "eval-none", "QLORA_EVAL__REQUIRE_IMPROVEMENT": "true"})
    assert result.returncode == ExitCode.CONFIG and "needs an evaluation set" in result.stderr


@pytest.mark.long  # make test-long
def test_merged_export_reloads_with_plain_transformers_and_reproduces_the_answer(s3, bucket, job_env, tmp_path):
    env = {**job_env, "QLORA_RUN_ID": "merged", "QLORA_EXPORT__MERGED": "true",
           "QLORA_VERIFY__PROMPTS": json.dumps([PROBE]), "QLORA_EXPORT__GGUF": "try",
           "QLORA_EXPORT__LLAMA_CPP_DIR": LLAMA_CPP}
    result = run_job(env=env)
    assert result.returncode == 0, result.stderr
    keys = set(_objects(s3, bucket, "runs/merged/"))
    assert {"runs/merged/merged/model.safetensors", "runs/merged/merged/config.json", "runs/merged/verify-merged.json"} <= keys
    assert _json(s3, bucket, "runs/merged/verify-merged.json")["passed"]
    # The real llama.cpp converter does not know the tiny tokenizer's pre-tokenizer: with `try` that is a
    # warning and the run publishes without a GGUF file.
    warned = [e for e in _events(result.stdout) if e["event"] == "GGUF conversion failed; publishing without it"]
    assert warned and "pre-tokenizer was not recognized" in warned[0]["error"]
    assert not any("/gguf/" in k for k in keys)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "merged"
    for key in (k for k in keys if k.startswith("runs/merged/merged/")):
        local.mkdir(exist_ok=True)
        s3.download_file(bucket, key, str(local / key.rsplit("/", 1)[1]))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")], "the adapter's stop tokens"
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROBE["prompt"]}], add_generation_prompt=True,
                                           enable_thinking=False, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == PROBE["expected"]


@pytest.fixture(scope="module")
def qwen2_vocab_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3 model with Qwen2's real vocabulary, read from llama.cpp's ggml-vocab-qwen2.gguf:
    the converter recognises its tokenizer as it would a released Qwen model's (the sample-trained one it refuses)."""
    from transformers import AutoTokenizer

    from job.tiny import make_tiny_model

    vocab = Path(LLAMA_CPP) / "models" / "ggml-vocab-qwen2.gguf"
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": ["<|im_start|>", "<think>", "</think>"]})
    return make_tiny_model(tmp_path_factory.mktemp("qwen2-vocab") / "model", tokenizer=tokenizer)


def _gguf_field(reader, name: str):
    field = reader.fields[name]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0].item()


@pytest.mark.long  # make test-long
def test_gguf_export_is_published_with_its_checksum_and_answers_like_the_adapter(s3, bucket, job_env, qwen2_vocab_model, tmp_path):
    env = {**job_env, "QLORA_RUN_ID": "gguf", "QLORA_MODEL__NAME": str(qwen2_vocab_model), "QLORA_EXPORT__MERGED": "true",
           "QLORA_EXPORT__GGUF": "require", "QLORA_EXPORT__LLAMA_CPP_DIR": LLAMA_CPP, "QLORA_VERIFY__PROMPTS": json.dumps([PROBE])}
    result = run_job(env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    entry = next(o for o in _json(s3, bucket, "runs/gguf/manifest.json")["objects"] if o["key"] == "gguf/model-q8_0.gguf")
    gguf_file = tmp_path / "model-q8_0.gguf"
    s3.download_file(bucket, "runs/gguf/gguf/model-q8_0.gguf", str(gguf_file))
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == entry["sha256"] and gguf_file.stat().st_size == entry["size"]

    # What llama.cpp will read: a Qwen3 model, Qwen2's pre-tokenizer recognised, 8-bit weights.
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    assert _gguf_field(reader, "general.architecture") == "qwen3"
    assert _gguf_field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert "Q8_0" in {t.tensor_type.name for t in reader.tensors}

    # transformers reads the GGUF back (dequantised): the exported model gives the adapter's answer.
    # Its GGUF loader does not map attention.key_length to head_dim (Qwen3-0.6B's 128 is the default).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name,
                                                 head_dim=_gguf_field(reader, "qwen3.attention.key_length"))
    tokenizer = AutoTokenizer.from_pretrained(qwen2_vocab_model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROBE["prompt"]}], add_generation_prompt=True,
                                           enable_thinking=False, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == PROBE["expected"]

    # llama.cpp itself (llama-cpp-python built from the same sdist by make test-long): the merged GGUF, and the base
    # model's own GGUF with the published LoRA GGUF, each answer the probe as the adapter did.
    from llama_cpp import Llama

    manifest = _json(s3, bucket, "runs/gguf/manifest.json")
    lora_entry = next(o for o in manifest["objects"] if o["key"] == "gguf/adapter-f16.gguf")
    lora_file, base_file = tmp_path / "adapter-f16.gguf", tmp_path / "base-f16.gguf"
    s3.download_file(bucket, "runs/gguf/gguf/adapter-f16.gguf", str(lora_file))
    assert hashlib.sha256(lora_file.read_bytes()).hexdigest() == lora_entry["sha256"]
    assert manifest["servable"]["llama_cpp"]["servable"] is True
    converted = subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), str(qwen2_vocab_model),
                                "--outfile", str(base_file), "--outtype", "f16"], capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr[-2000:]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE["prompt"]}], add_generation_prompt=True,
                                           enable_thinking=False, tokenize=False)
    for files in ({"model_path": str(gguf_file)}, {"model_path": str(base_file), "lora_path": str(lora_file)}):
        llm = Llama(n_ctx=256, seed=0, verbose=False, **files)
        answer = llm(prompt, max_tokens=32, temperature=0.0, stop=["<|im_end|>"])["choices"][0]["text"].strip()
        assert answer == PROBE["expected"], (files, answer)
    base_alone = Llama(model_path=str(base_file), n_ctx=256, seed=0, verbose=False)
    assert base_alone(prompt, max_tokens=32, temperature=0.0, stop=["<|im_end|>"])["choices"][0]["text"].strip() != PROBE["expected"]


@pytest.mark.long  # make test-long
def test_gguf_required_fails_fast_without_a_converter_and_with_exit_6_when_conversion_fails(s3, bucket, job_env):
    result = run_job(env={**job_env, "QLORA_RUN_ID": "gguf-none", "QLORA_EXPORT__MERGED": "true",
                          "QLORA_EXPORT__GGUF": "require", "QLORA_EXPORT__LLAMA_CPP_DIR": "/nonexistent"})
    assert result.returncode == ExitCode.CONFIG and "convert_hf_to_gguf.py does not exist" in result.stderr
    assert not any(e["event"] == "dataset fetched" for e in _events(result.stdout))

    result = run_job(env={**job_env, "QLORA_RUN_ID": "gguf-fail", "QLORA_EXPORT__MERGED": "true", "QLORA_EXPORT__GGUF": "require",
                          "QLORA_EXPORT__LLAMA_CPP_DIR": LLAMA_CPP})
    assert result.returncode == ExitCode.EXPORT, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("qlora-job: error: GGUF conversion failed")
    assert not _objects(s3, bucket, "runs/gguf-fail/")


@pytest.mark.long  # make test-long
def test_two_nodes_one_rendezvous_node_0_publishes(s3, bucket, job_env, tmp_path):
    """Kubeflow Trainer's PET_* layout, two single-process 'nodes' on this machine (gloo)."""
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(("QLORA_", "AWS_"))}
    procs = []
    for rank in (0, 1):
        env = {**base, **job_env, "QLORA_LOG_FORMAT": "json", "QLORA_TERMINATION_LOG": "/dev/null", "QLORA_RUN_ID": "two-nodes",
               "QLORA_WORK_DIR": str(tmp_path / f"node{rank}"), "PET_NNODES": "2", "PET_NODE_RANK": str(rank),
               "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    node1 = _events(outputs[1][0])
    assert any(e["event"].startswith("training finished on this node") for e in node1)
    assert not any(e["event"] == "run published" for e in node1)
    metrics = _json(s3, bucket, "runs/two-nodes/metrics.json")
    assert metrics["world_size"] == 2 and _json(s3, bucket, "runs/two-nodes/verify.json")["passed"]
