"""Label masking on the tiny tokenizer with Qwen3's real chat template, for every input format."""

import json

import pytest

from job.data import validate_dataset
from job.settings import Settings

ROWS = {
    "instruction": {"instruction": "What does ISAC stand for?", "output": "Integrated sensing and communication."},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does ISAC stand for?"},
                              {"role": "assistant", "content": "Integrated sensing and communication."}]},
    "prompt": {"prompt": "What does ISAC stand for?", "completion": "Integrated sensing and communication."},
    "conversational prompt": {"prompt": [{"role": "user", "content": "What does ISAC stand for?"}],
                              "completion": [{"role": "assistant", "content": "Integrated sensing and communication."}]},
}


def _spec(settings, model: str, report, eval_report, work, run_uri: str, run_id: str):
    """The rows stage, then the TrainSpec, as a run makes them."""
    from transformers import AutoTokenizer

    from job import rows, train

    shaped = rows.prepare(settings, report, eval_report, AutoTokenizer.from_pretrained(model), work)
    return train.prepare(settings, "transformers", model, shaped, work, run_uri, run_id)


@pytest.fixture
def settings(tmp_path, clean_env):
    return Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"), work_dir=tmp_path,
                    train={"max_steps": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 1})


@pytest.mark.parametrize("kind", ROWS)
def test_prompt_is_masked_and_answer_with_end_of_turn_is_trained(kind, tmp_path, tiny_model, tiny_tokenizer, settings):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from job.rows import load_train_dataset
    from job.train import check_labels, sft_config

    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps(ROWS[kind]) + "\n")
    report = validate_dataset(source, tmp_path)
    dataset, _, _ = load_train_dataset(report, tiny_tokenizer, settings)
    assert report.rejected == 0
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = SFTTrainer(model=model, processing_class=tiny_tokenizer, train_dataset=dataset,
                         args=sft_config(settings, tmp_path / "ckpt", cuda=False))
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    decode = tiny_tokenizer.decode
    # Qwen3's non-thinking answer form, then end-of-turn and the newline that follows it.
    assert decode(trained) == "<think>\n\n</think>\n\nIntegrated sensing and communication.<|im_end|>\n"
    masked = decode([i for i, label in zip(ids, labels, strict=True) if label == -100])
    assert masked.endswith("<|im_start|>user\nWhat does ISAC stand for?<|im_end|>\n<|im_start|>assistant\n")
    assert ("Be brief." in masked) == (kind == "messages")
    assert check_labels(trainer, tiny_tokenizer.eos_token_id)["end_of_turn_trained"] == 1


MULTI_TURN = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does ISAC stand for?"},
                           {"role": "assistant", "content": "Integrated sensing and communication."},
                           {"role": "user", "content": "And RIS?"}, {"role": "assistant", "content": "Reconfigurable intelligent surface."}]}


def _trained_rows(rows, tmp_path, tiny_model, tiny_tokenizer, settings):
    """Each training row's (input_ids, labels) as the SFTTrainer sees them, and its first-batch label check."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from job.rows import expand_turns, load_train_dataset
    from job.train import check_labels, sft_config

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, _, _ = load_train_dataset(validate_dataset(tmp_path / "d.jsonl", tmp_path), tiny_tokenizer, settings)
    dataset = expand_turns(dataset, settings.data.train_turns).remove_columns(["source", "format"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = SFTTrainer(model=model, processing_class=tiny_tokenizer, train_dataset=dataset,
                         args=sft_config(settings, tmp_path / "ckpt", cuda=False))
    return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset], check_labels(trainer, tiny_tokenizer.eos_token_id)


@pytest.mark.parametrize("train_turns", ["all", "last"])
def test_every_assistant_turn_of_a_conversation_is_trained_and_user_turns_are_masked(train_turns, tmp_path, tiny_model,
                                                                                    tiny_tokenizer, settings):
    settings.data.train_turns = train_turns
    settings.train.per_device_batch_size = 3  # every row in the first batch, for the label check's count
    rows, labels = _trained_rows([MULTI_TURN, ROWS["instruction"]], tmp_path, tiny_model, tiny_tokenizer, settings)

    def split(ids, row_labels):
        pairs = list(zip(ids, row_labels, strict=True))
        return (tiny_tokenizer.decode([i for i, label in pairs if label != -100]),
                tiny_tokenizer.decode([i for i, label in pairs if label == -100]))

    # Each turn in Qwen3's non-thinking answer form, as the model produces it, then end-of-turn and newline.
    first, last = ("<think>\n\n</think>\n\n" + a + "<|im_end|>\n" for a in ("Integrated sensing and communication.",
                                                                              "Reconfigurable intelligent surface."))
    if train_turns == "all":
        assert len(rows) == 3 and labels["turns_trained"] == 3
        trained, masked = split(*rows[0])
        assert trained == first and masked.endswith("<|im_start|>user\nWhat does ISAC stand for?<|im_end|>\n<|im_start|>assistant\n")
        assert "Be brief." in masked and "RIS" not in masked + trained
    else:
        assert len(rows) == 2 and labels["turns_trained"] == 2
    trained, masked = split(*rows[-2])  # the whole conversation: the earlier answer is context
    assert trained == last
    assert all(text in masked for text in ("Be brief.", "What does ISAC stand for?", "Integrated sensing and communication.<|im_end|>",
                                           "And RIS?"))
    assert split(*rows[-1])[0] == "<think>\n\n</think>\n\nIntegrated sensing and communication.<|im_end|>\n"  # the single-turn row


def test_overlength_rows_are_rejected_with_their_line_or_kept_for_truncation(tmp_path, tiny_tokenizer, settings):
    from job.rows import load_train_dataset

    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps({"instruction": "short", "output": "fine"}) + "\n"
                      + json.dumps({"instruction": "long " * 200, "output": "too long"}) + "\n")
    report = validate_dataset(source, tmp_path)
    settings.model.max_seq_length = 64
    dataset, _, _ = load_train_dataset(report, tiny_tokenizer, settings)
    assert (len(dataset), report.accepted, report.rejected, report.truncated) == (1, 1, 1, 0)
    reject = json.loads(report.rejects_path.read_text().splitlines()[-1])
    assert reject["line"] == 2 and "longer than QLORA_MODEL__MAX_SEQ_LENGTH=64" in reject["reason"]

    settings.data.overlength = "truncate"
    report = validate_dataset(source, tmp_path / "again")
    dataset, _, _ = load_train_dataset(report, tiny_tokenizer, settings)
    assert (len(dataset), report.accepted, report.rejected, report.truncated) == (2, 2, 0, 1)



@pytest.mark.parametrize(("given", "expected"), [(None, "0"), ("1", "1")])
def test_unsloth_fused_loss_is_off_unless_the_environment_asks_for_it(given, expected):
    """The engine turns Unsloth's Triton fused cross-entropy off before Unsloth is imported (mid-training
    recompiles, bench/RESULTS.md run 13); a value set in the pod's environment wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "UNSLOTH_FUSED_LINEAR"}
    if given is not None:
        env["UNSLOTH_FUSED_LINEAR"] = given
    out = subprocess.run([sys.executable, "-c", "import os, job.engine; print(os.environ['UNSLOTH_FUSED_LINEAR'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_the_train_spec_crosses_the_process_boundary_whole_and_without_the_secret(clean_env, monkeypatch, tmp_path):
    """The one value a DDP worker gets: every field survives JSON, settings come from the spec (not from
    the worker's environment), and the token is taken from the environment instead of the file."""
    from pathlib import Path

    from job.train import TrainSpec

    settings = Settings(dataset_uri="s3://data/x.jsonl", output_uri="s3://out/runs", hf_token="hf_secret_value",
                        train={"max_steps": 5, "recipe": "seed"}, verify={"prompts": [{"prompt": "hi", "expected": "hello"}]})
    spec = TrainSpec(settings=settings, engine="transformers", model_source="/models/base", train_dataset=tmp_path / "train",
                     eval_dataset=None, mean_row_tokens=41.5, adapter_dir=tmp_path / "adapter", checkpoint_dir=tmp_path / "ckpt",
                     run_id="r1", run_uri="s3://out/runs/r1", resume_from=Path("/w/resume/checkpoint-4"),
                     metrics_path=tmp_path / "m.json", errors_dir=tmp_path / "errors")
    text = spec.to_json()
    assert "hf_secret_value" not in text
    monkeypatch.setenv("QLORA_TRAIN__MAX_STEPS", "99")  # a worker's environment does not override the spec
    monkeypatch.setenv("QLORA_HF_TOKEN", "hf_secret_value")
    assert TrainSpec.from_json(text) == spec


def test_steady_throughput_skips_the_warm_up_steps():
    from job.train import _step_seconds, steady_tokens_per_second

    steps = [(1.0 + i, 100 * (i + 1)) for i in range(8)]  # one step a second, 100 tokens each
    assert steady_tokens_per_second(steps) == 100.0
    assert steady_tokens_per_second(steps[:1]) is None
    assert _step_seconds(0.0, steps[:3]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("recipe, stop_after, steps_per_epoch", [("fast", 8, 6), ("seed", 4, 3)])
def test_a_run_resumed_mid_epoch_sees_each_row_of_that_epoch_once(recipe, stop_after, steps_per_epoch, tmp_path, tiny_model,
                                                                   tiny_tokenizer, clean_env):
    """2 epochs of 24 rows (fast: 4 a step, length-grouped; seed: 2 x 4 accumulation, random order): stopped
    (SIGTERM) in epoch 2, resumed from its checkpoint in a fresh work folder; every row is trained once in
    epoch 1 and once in epoch 2, across both processes' steps."""
    import os
    import re
    import signal

    from transformers import TrainerCallback

    from job import train as training
    from job.errors import Terminated

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Question number {i}?", "output": f"Answer {i}."}) + "\n" for i in range(24)))
    settings = Settings(dataset_uri=str(source), output_uri=str(tmp_path / "out"), engine="transformers",
                        train={"recipe": recipe, "epochs": 2, **({"per_device_batch_size": 4} if recipe == "fast" else {})},
                        checkpoint={"every_minutes": 0})

    class Rows(TrainerCallback):
        """The rows of every training micro-batch, by question number, read from the model's inputs."""

        def __init__(self, stop_after: int | None = None):
            self.seen, self.stop_after, self.hook = [], stop_after, None

        def record(self, module, args, kwargs):
            for ids in kwargs["input_ids"]:
                self.seen.append(int(re.search(r"Question number (\d+)", tiny_tokenizer.decode(ids)).group(1)))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.hook = model.register_forward_pre_hook(self.record, with_kwargs=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.stop_after:
                os.kill(os.getpid(), signal.SIGTERM)  # as a preempted pod gets it; the next step ends with the checkpoint

        def on_train_end(self, args, state, control, **kwargs):
            self.hook.remove()

    def spec(work):
        report = validate_dataset(source, work)
        return _spec(settings, str(tiny_model), report, None, work, str(tmp_path / "out" / "r1"), "r1")

    first = Rows(stop_after=stop_after)  # inside epoch 2
    with pytest.raises(Terminated):
        training.train(spec(tmp_path / "work-1"), extra_callbacks=(first,))
    resumed_spec = spec(tmp_path / "work-2")
    saved = stop_after + 1
    assert resumed_spec.resume_from is not None and resumed_spec.resume_from.name == f"checkpoint-{saved}"
    second = Rows()
    metrics = training.train(resumed_spec, extra_callbacks=(second,))
    # The first process trained all 24 rows, then part of epoch 2; the second the rest of epoch 2.
    assert len(first.seen) == saved * 24 // steps_per_epoch and len(first.seen) + len(second.seen) == 48
    assert sorted(first.seen[:24]) == list(range(24))
    assert sorted(first.seen[24:] + second.seen) == list(range(24)), (str(first.seen), str(second.seen))
    steps = 2 * steps_per_epoch
    assert (metrics.steps, metrics.epochs_trained, metrics.duration["steps"], metrics.duration["steps_per_epoch"]) == (steps, 2.0, steps, steps_per_epoch)
    assert metrics.loss_curve[0]["step"] == saved + 1


def test_early_stopping_keeps_the_best_adapter_and_the_best_survives_a_resume(tmp_path, tiny_model, clean_env):
    """Four facts trained; the eval set holds three of them and a fourth answer the training data contradicts, so
    eval loss falls while the facts are learnt and rises as the contradicted answer is memorised (lowest at step 100
    on one CPU, 80 on another: the kernels differ). Evaluated every 10 steps with patience 4, stopped by SIGTERM at
    step 104 and resumed in a fresh work folder: the resumed process never evaluates the best step, yet keeps its
    adapter (from the checkpoint), stops after four worse evaluations and saves that adapter, not the last."""
    import os
    import signal

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from job import train as training
    from job.errors import Terminated
    from tests.test_e2e import FACTS

    source, held_out = tmp_path / "facts.jsonl", tmp_path / "eval.jsonl"
    source.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    contradicted = [*FACTS[:3], (FACTS[3][0], "Nobody at all, sadly.")]
    held_out.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in contradicted))
    settings = Settings(dataset_uri=str(source), output_uri=str(tmp_path / "out"), engine="transformers",
                        train={"max_steps": 150, "learning_rate": 1e-2, "warmup_steps": 5}, checkpoint={"every_minutes": 0},
                        eval={"dataset_uri": str(held_out), "strategy": "steps", "steps": 10, "early_stopping_patience": 4})

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 104:
                os.kill(os.getpid(), signal.SIGTERM)  # the checkpoint follows at the end of step 105

    def spec(work):
        return _spec(settings, str(tiny_model), validate_dataset(source, work / "data"), validate_dataset(held_out, work / "eval"),
                     work, str(tmp_path / "out" / "r1"), "r1")

    with pytest.raises(Terminated):
        training.train(spec(tmp_path / "work-1"), extra_callbacks=(StopAt(),))
    checkpoint = tmp_path / "out" / "r1" / "checkpoints" / "checkpoint-105"
    best_step = json.loads((checkpoint / "best-adapter.json").read_text())["step"]
    assert best_step in (70, 80, 90, 100), best_step  # falls, then rises: a best before the stop, not at the start
    best_weights = load_file(checkpoint / "best-adapter.safetensors")
    assert not [p for p in checkpoint.iterdir() if p.is_dir()], "a subfolder with weights is loaded as a second adapter"

    resumed = spec(tmp_path / "work-2")
    assert resumed.resume_from.name == "checkpoint-105"
    metrics = training.train(resumed)
    evaluated = {p["step"]: p["eval_loss"] for p in metrics.eval_curve}
    stop = best_step + 4 * 10  # four worse evaluations after the best, counted across the resume
    assert sorted(evaluated) == [0, *range(110, stop + 1, 10)], metrics.eval_curve  # before training, then every 10 steps
    assert metrics.steps == stop and metrics.stopped_early
    # the resumed run goes on from the checkpoint's adapter, not from fresh LoRA weights (the eval before training
    # ran on those: the Trainer loads the checkpoint after it)
    assert evaluated[110] < evaluated[0] / 2, metrics.eval_curve
    assert metrics.best["step"] == best_step and metrics.eval_loss_after == metrics.best["eval_loss"]
    assert all(loss > metrics.best["eval_loss"] for step, loss in evaluated.items() if step)
    saved = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == best_weights.keys() and all((saved[k] == best_weights[k]).all() for k in saved)


@pytest.mark.parametrize(("strategy", "best_metric"), [("no", None), ("epoch", "eval_loss"), ("steps", "eval_loss")])
def test_evaluations_during_training_track_the_lowest_eval_loss(strategy, best_metric, tmp_path, clean_env):
    from job.train import sft_config

    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"),
                        eval={"fraction": 0.1, "strategy": strategy, "steps": 7})
    args = sft_config(settings, tmp_path / "ckpt", cuda=False)
    assert (args.eval_strategy, args.metric_for_best_model, args.greater_is_better) == (strategy, best_metric, False)
    assert args.eval_steps == 7 and args.load_best_model_at_end is False  # the best adapter is kept by our callback


def test_a_short_last_micro_batch_is_filled_with_rows_that_change_nothing(tmp_path, tiny_model, tiny_tokenizer, clean_env):
    """CUDA graphs record one shape per (rows, length): the epoch's last micro-batch, short of rows, was one more.
    Filled up with copies that train nothing, it has the usual rows and the same loss and gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from job.rows import load_train_dataset
    from job.train import full_micro_batches, sft_config

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer " * (i + 1)}) + "\n" for i in range(6)))
    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"), work_dir=tmp_path,
                        train={"max_steps": 1, "per_device_batch_size": 4, "gradient_accumulation_steps": 1})
    dataset, _, _ = load_train_dataset(validate_dataset(source, tmp_path), tiny_tokenizer, settings)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = SFTTrainer(model=model, processing_class=tiny_tokenizer, train_dataset=dataset,
                         args=sft_config(settings, tmp_path / "ckpt", cuda=False))
    plain = [batch for batch in trainer.get_train_dataloader()]
    full_micro_batches(trainer, 4)
    full = [batch for batch in trainer.get_train_dataloader()]
    assert [len(b["input_ids"]) for b in plain] == [4, 2] and [len(b["input_ids"]) for b in full] == [4, 4]
    assert len(next(iter(trainer.get_eval_dataloader(trainer.train_dataset.select(range(5)))))["input_ids"]) == 4, "eval batches untouched"

    model.eval()  # no dropout: the same arithmetic for both batches

    def loss_and_grads(batch):
        model.zero_grad()
        labels = batch["labels"]
        loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels,
                     num_items_in_batch=(labels[:, 1:] != -100).sum()).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    features = [{k: v for k, v in trainer.train_dataset[i].items() if k in ("input_ids", "labels")} for i in (4, 5)]
    short, filled = trainer.data_collator(features), trainer.get_train_dataloader().collate_fn(features)
    assert (filled["labels"][2:] == -100).all() and torch.equal(filled["input_ids"][:2], short["input_ids"])
    (loss_short, grads_short), (loss_full, grads_full) = loss_and_grads(short), loss_and_grads(filled)
    assert loss_full == pytest.approx(loss_short, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_short, grads_full, strict=True))


def test_the_plan_is_fitted_to_the_card_cuda_reports(tmp_path, tiny_model, clean_env, monkeypatch):
    """fit_to_this_card on a CUDA machine, faked: the card's name and free memory as torch reports them, the model's
    config, the longest kept row. (Its log line once repeated a keyword and failed every GPU run with exit 1.)"""
    import torch

    from job import plan as planning
    from job.train import fit_to_this_card

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "NVIDIA L4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 22 * 2**30))
    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"), work_dir=tmp_path)
    plan = planning.batch_plan(settings.train, settings.model.max_seq_length, 573, 1, 3000, cuda=True)
    fitted, fit = fit_to_this_card(settings, str(tiny_model), plan, 1079)
    assert (fit.card, fit.budget_gib) == ("L4", round(20 * 0.85 - 0.5, 2))
    assert fit.micro_batch_tokens == fitted.per_device_batch_size * planning.padded(1079, plan.pad_to_multiple_of, 2048)
    assert fit.peak_gpu_memory_gib <= fit.budget_gib and fitted.rows_per_step == plan.rows_per_step
    # Before the data is measured (0), the longest row is taken as max_seq_length.
    assert fit_to_this_card(settings, str(tiny_model), plan, 0)[1].micro_batch_tokens == fitted.per_device_batch_size * 2048


@pytest.mark.parametrize(("choice", "recomputed"), [("false", False), ("true", True)])
def test_the_checkpointing_the_load_chose_is_what_trains(choice, recomputed, tmp_path, tiny_model, clean_env):
    """The plan (or QLORA_LORA__GRADIENT_CHECKPOINTING) decides recomputation at load; the Trainer must not turn it on
    behind that choice (TRL's SFTConfig defaults gradient_checkpointing to True: planned-off runs recomputed anyway).
    Read where transformers reads it: each decoder layer's flag after a training step."""
    from job import train

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n" for i in range(8)))
    settings = Settings(dataset_uri=str(source), output_uri=str(tmp_path / "out"), work_dir=tmp_path,
                        lora={"gradient_checkpointing": choice}, train={"max_steps": 1})
    spec = _spec(settings, str(tiny_model), validate_dataset(source, tmp_path), None, tmp_path, str(tmp_path / "out" / "r"), "r")
    session = train.setup(spec)
    train.fit(session)
    layers = [m for m in session.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) == 2 and [m.gradient_checkpointing for m in layers] == [recomputed] * 2
    assert session.trainer.args.gradient_checkpointing is False
