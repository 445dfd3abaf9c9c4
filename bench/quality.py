"""Recipe quality on real weights: the `fast` recipe against the `seed` recipe, same data, same seed,
at equal epochs (every row seen as often, so equal training tokens), judged on held-out rows.

The data is generated: invented facts about invented relay stations (no pretrained model knows them),
each asked three ways in training; the held-out set asks every fact a fourth way, with the same answer.
Held-out eval loss and held-out answer accuracy (the fact's value in the greedy answer) therefore
measure learning the facts, not recalling the training strings.

    python bench/quality.py OUTDIR [MODEL_DIR]        # MODEL_DIR: `make real-model`'s folder by default
    RUNS=seed,fast EPOCHS=2 STATIONS=50 python bench/quality.py OUTDIR
    RUNS="seed,fast:lr=4e-4;rows=32" ...             # overrides: lr, rows (a micro-batch), warmup

Each run is `python -m job` with local paths (transformers engine on CPU, or unsloth where it runs);
OUTDIR/quality.json holds every figure."""

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYLLABLES = ["ka", "lo", "mi", "ren", "dor", "vi", "sa", "tem", "quo", "bel", "nar", "zu", "fen", "gri", "hal", "jor"]
ATTRIBUTES = {  # attribute: (training phrasings, held-out phrasing, answer)
    "city": (["Where is the {s} relay station?", "In which city is the {s} relay station located?",
              "Which city hosts the {s} relay station?"],
             "What city is home to the {s} relay station?", "The {s} relay station is in {v}."),
    "codename": (["What is the codename of the {s} relay station?", "Which codename does the {s} relay station use?",
                  "Under what codename does the {s} relay station run?"],
                 "What is the {s} relay station codenamed?", "The {s} relay station is codenamed {v}."),
    "operator": (["Who operates the {s} relay station?", "Which company runs the {s} relay station?",
                  "Which operator is in charge of the {s} relay station?"],
                 "What company operates the {s} relay station?", "The {s} relay station is operated by {v}."),
}


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_dataset(out: Path, stations: int, seed: int = 0) -> tuple[Path, Path, list[dict]]:
    """train.jsonl (3 phrasings x 3 facts a station) and heldout.jsonl (the fourth phrasing of every fact)."""
    rng = random.Random(seed)
    names = set()
    while len(names) < stations:
        names.add(_word(rng, 3))
    train, heldout = [], []
    for name in sorted(names):
        for attribute, (phrasings, held_out_phrasing, answer) in ATTRIBUTES.items():
            value = _word(rng, 2) + (" Networks" if attribute == "operator" else "")
            for phrasing in phrasings:
                train.append({"instruction": phrasing.format(s=name), "output": answer.format(s=name, v=value)})
            heldout.append({"instruction": held_out_phrasing.format(s=name), "output": answer.format(s=name, v=value),
                            "value": value})
    random.Random(seed + 1).shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in train))
    heldout_path.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "output")}) + "\n" for r in heldout))
    return train_path, heldout_path, heldout


def rows_per_step(env: dict, train_path: Path, model: str) -> int:
    """The job's own batch plan for these settings and rows (so a run's steps cover whole epochs)."""
    from transformers import AutoTokenizer

    from job.data import validate_dataset
    from job.plan import batch_plan
    from job.rows import load_train_dataset
    from job.settings import Settings

    old = dict(os.environ)
    os.environ.update(env)
    try:
        settings = Settings()
        report = validate_dataset(train_path, Path(env["QLORA_WORK_DIR"]))
        dataset, mean_row_tokens, _ = load_train_dataset(report, AutoTokenizer.from_pretrained(model), settings)
        return batch_plan(settings.train, settings.model.max_seq_length, mean_row_tokens, 1, len(dataset)).rows_per_step
    finally:
        os.environ.clear()
        os.environ.update(old)


def held_out_accuracy(model_dir: str, adapter: Path, heldout: list[dict], limit: int, batch: int = 50) -> dict:
    """Greedy answers to the held-out questions (base + adapter, plain peft, batched with left padding);
    an answer is right when it names the fact's value."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.chat import stop_token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = PeftModel.from_pretrained(base.to(device), str(adapter)).eval()
    stop, rows, right, samples = stop_token_ids(tokenizer), heldout[:limit], 0, []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        inputs = tokenizer.apply_chat_template([[{"role": "user", "content": r["instruction"]}] for r in chunk],
                                               add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True).to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        for row, tokens in zip(chunk, output[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
            end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
            answer = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
            right += row["value"] in answer
            samples.append({"question": row["instruction"], "answer": answer, "value": row["value"]})
    return {"accuracy": round(right / len(rows), 4), "asked": len(rows), "samples": samples[:5]}


def parse_run(spec: str) -> tuple[str, str, dict]:
    """'fast:lr=4e-4;rows=32' -> (label, recipe, QLORA_* overrides)."""
    recipe, _, options = spec.partition(":")
    names = {"lr": "QLORA_TRAIN__LEARNING_RATE", "rows": "QLORA_TRAIN__PER_DEVICE_BATCH_SIZE", "warmup": "QLORA_TRAIN__WARMUP_STEPS"}
    overrides = {}
    for option in filter(None, options.split(";")):
        key, _, value = option.partition("=")
        overrides[names[key]] = value
    return spec, recipe, overrides


def main(out: Path, model: str) -> None:
    epochs = float(os.environ.get("EPOCHS", "2"))
    stations = int(os.environ.get("STATIONS", "50"))
    limit = int(os.environ.get("ASK", "150"))
    runs = os.environ.get("RUNS", "seed,fast").split(",")
    train_path, heldout_path, heldout = make_dataset(out / "data", stations)
    train_rows = len(train_path.read_text().splitlines())
    results = {"model": model, "stations": stations, "train_rows": train_rows, "heldout_rows": len(heldout),
               "epochs": epochs, "runs": []}
    for spec in runs:
        label, recipe, overrides = parse_run(spec)
        work = out / label.replace(":", "_").replace(";", "_").replace("=", "")
        env = {
            "QLORA_DATASET_URI": str(train_path), "QLORA_EVAL__DATASET_URI": str(heldout_path),
            "QLORA_OUTPUT_URI": str(work / "out"), "QLORA_WORK_DIR": str(work / "work"), "QLORA_RUN_ID": "run",
            "QLORA_MODEL__NAME": model, "QLORA_TRAIN__RECIPE": recipe, "QLORA_VERIFY__TRAIN_PROBES": "1",
            "QLORA_VERIFY__MAX_NEW_TOKENS": "48", "QLORA_RETRAIN__SKIP_UNCHANGED": "false", "QLORA_LOG_FORMAT": "json",
            "QLORA_TERMINATION_LOG": str(work / "termination-log"), "HF_HUB_OFFLINE": "1", **overrides,
        }
        per_step = rows_per_step(env, train_path, model)
        env["QLORA_TRAIN__MAX_STEPS"] = str(max(1, math.ceil(train_rows * epochs / per_step)))
        started = time.perf_counter()
        job = subprocess.run([sys.executable, "-m", "job"], env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        (work / "job.log").write_text(job.stdout + job.stderr)
        if job.returncode != 0:
            results["runs"].append({"run": label, "exit": job.returncode, "error": job.stderr.strip().splitlines()[-1:]})
            print(label, "exit", job.returncode, job.stderr[-500:], flush=True)
            continue
        metrics = json.loads((work / "out" / "run" / "metrics.json").read_text())
        accuracy = held_out_accuracy(model, work / "out" / "run" / "adapter", heldout, limit)
        row = {"run": label, "recipe": recipe, "overrides": overrides, "rows_per_step": per_step, "steps": metrics["steps"],
               "learning_rate": metrics["batch_plan"]["learning_rate"], "train_tokens": metrics["train_tokens"],
               "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1),
               "loss_first": metrics["loss_first"], "loss_last": metrics["loss_last"],
               "eval_loss_before": metrics["eval_loss_before"], "eval_loss_after": metrics["eval_loss_after"],
               "heldout_accuracy": accuracy["accuracy"], "asked": accuracy["asked"], "samples": accuracy["samples"]}
        results["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        (out / "quality.json").write_text(json.dumps(results, indent=2))
    seed = next((r for r in results["runs"] if r.get("run") == "seed" and "eval_loss_after" in r), None)
    for r in results["runs"]:
        if seed and "eval_loss_after" in r:
            r["eval_loss_vs_seed_pct"] = round(100 * (r["eval_loss_after"] / seed["eval_loss_after"] - 1), 2)
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    print(json.dumps([{k: r.get(k) for k in ("run", "steps", "learning_rate", "eval_loss_after", "eval_loss_vs_seed_pct",
                                             "heldout_accuracy", "train_seconds")} for r in results["runs"]], indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else str(REPO / ".models" / "smollm2-135m-instruct"))
