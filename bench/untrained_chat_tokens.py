"""Must the chat tokens' embedding rows be trained for a base model to stop? (issue 15, item 6)

Base models can ship `<|im_start|>`/`<|im_end|>` rows that pretraining never updated (QwenLM/Qwen3#1064;
Unsloth refuses such models unless embed_tokens and lm_head are trained, unsloth#1024). SmolLM2-135M-
Instruct, its two chat-token rows reset (tied embeddings: input row and output row at once) to what an
initialised, never-trained row looks like (UNTRAINED=init: N(0, 0.02), the usual init) or to zero
(UNTRAINED=zero), stands in for such a model. Three jobs on the demo data, same settings:

  trained-rows      the model as released (control)
  untrained-rows    LoRA on the 7 projections only
  untrained+tokens  LoRA plus QLORA_LORA__TRAINABLE_TOKENS='["<|im_start|>","<|im_end|>"]'

For each: the verify gate's outcome and, per probe (the 6 training questions and 4 unseen ones),
whether the answer ended with <|im_end|> within 40 tokens.

    [UNTRAINED=init|zero] [RUNS=trained-rows,untrained-rows,untrained+tokens] python bench/untrained_chat_tokens.py OUTDIR [MODEL_DIR]
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNSEEN = ["What is the capital of France?", "Name a primary colour.", "How many days are in a week?", "What is 6G?"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def untrained_copy(model_dir: Path, out: Path, how: str) -> dict:
    """The model with its chat tokens' rows reset; returns the rows' norms before, against the median row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    weight = model.get_input_embeddings().weight
    norms = weight.float().norm(dim=1)
    before = {"median_row_norm": round(norms.median().item(), 4), **{t: round(norms[i].item(), 4) for t, i in zip(CHAT_TOKENS, ids, strict=True)},
              "tied": model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()}
    with torch.no_grad():
        torch.manual_seed(0)
        weight[ids] = 0 if how == "zero" else torch.randn(len(ids), weight.shape[1], dtype=weight.dtype) * 0.02
    shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    model.save_pretrained(out, safe_serialization=True)
    return before


def run_job(label: str, model: Path, out: Path, extra: dict) -> dict:
    work = out / label
    env = {
        "QLORA_DATASET_URI": str(REPO / "job" / "sample" / "6g_lab_en.jsonl"), "QLORA_OUTPUT_URI": str(work / "out"),
        "QLORA_WORK_DIR": str(work / "work"), "QLORA_RUN_ID": "run", "QLORA_MODEL__NAME": str(model),
        "QLORA_TRAIN__MAX_STEPS": "18", "QLORA_TRAIN__LEARNING_RATE": "3e-3", "QLORA_VERIFY__TRAIN_PROBES": "6",
        "QLORA_VERIFY__MAX_NEW_TOKENS": "40", "QLORA_VERIFY__PROMPTS": json.dumps([{"prompt": p} for p in UNSEEN]),
        "QLORA_RETRAIN__SKIP_UNCHANGED": "false", "QLORA_LOG_FORMAT": "json", "QLORA_TERMINATION_LOG": str(work / "termination-log"),
        "HF_HUB_OFFLINE": "1", **extra,
    }
    job = subprocess.run([sys.executable, "-m", "job"], env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True)
    (work / "job.log").write_text(job.stdout + job.stderr)
    report = next(iter(sorted(work.rglob("verify.json"))), None)  # published, or left in the work folder by a failed gate
    probes = json.loads(report.read_text())["probes"] if report else []
    return {
        "run": label, "exit": job.returncode, "error": (job.stderr.strip().splitlines() or [""])[-1],
        "ended_train": sum(p["ended_turn"] for p in probes if p["source"] != "settings"),
        "ended_unseen": sum(p["ended_turn"] for p in probes if p["source"] == "settings"),
        "answers": [(p["prompt"], p["answer"][:100], p["ended_turn"]) for p in probes],
    }


def main(out: Path, model_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    how = os.environ.get("UNTRAINED", "init")
    norms = untrained_copy(model_dir, out / "untrained-model", how)
    print(json.dumps({"rows_before_reset": norms, "reset_to": how}), flush=True)
    results = {"rows_before_reset": norms, "reset_to": how, "runs": []}
    wanted = os.environ.get("RUNS", "trained-rows,untrained-rows,untrained+tokens").split(",")
    for label, model, extra in [
        ("trained-rows", model_dir, {}),
        ("untrained-rows", out / "untrained-model", {}),
        ("untrained+tokens", out / "untrained-model", {"QLORA_LORA__TRAINABLE_TOKENS": json.dumps(CHAT_TOKENS)}),
    ]:
        if label not in wanted:
            continue
        row = run_job(label, model, out, extra)
        results["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
        (out / "untrained_chat_tokens.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / ".models" / "smollm2-135m-instruct")
