"""GPU sweep, in one process (Unsloth imported once): where a training step's time goes, how
step time grows with the micro-batch's token budget, and the quality guard (training loss at
equal tokens against the seed recipe) for learning-rate choices.

    python bench/gpu_sweep.py OUTDIR        (after `gpu_anchor.py prepare`; SWEEP=profile,budgets,guard)

Every variant is the job's own code path (job.rows.prepare, job.train.prepare and job.train.train, one TrainSpec each)
on the anchor's Qwen3-0.6B-shaped random model and 3,000 synthetic rows. Writes OUTDIR/sweep.json
and OUTDIR/profile.txt."""

import json
import os
import sys
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL_DIR, DATA = "/tmp/qwen3-0.6b-rand", Path("/tmp/sft.jsonl")

import torch  # noqa: E402
import unsloth  # noqa: E402,F401  (before transformers/trl/peft)
from profiling import summarise  # noqa: E402  (this script's folder is on sys.path)
from transformers import TrainerCallback  # noqa: E402

from job import data, engine, train  # noqa: E402
from job.settings import Settings  # noqa: E402


class StepProfiler(TrainerCallback):
    """torch.profiler over `count` optimizer steps starting after `start` warm-up steps."""

    def __init__(self, start: int, count: int, out: Path):
        self.start, self.count, self.out, self.prof, self.summary = start, count, out, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start and self.prof is None:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None or self.summary or state.global_step < self.start + self.count:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        try:
            self.summary = summarise(self.prof, wall, self.count, self.out)
        except Exception as error:  # a summary bug must not lose the sweep
            self.summary = {"error": repr(error), "wall_s": wall}


def run_variant(name: str, work: Path, train_kw: dict, lora_kw: dict | None = None,
                profile: tuple[int, int] | None = None, profile_dir: Path | None = None) -> dict:
    settings = Settings(dataset_uri=str(DATA), output_uri=str(work / "out"), work_dir=work, engine="unsloth",
                        train=train_kw, lora=lora_kw or {})
    report = data.validate_dataset(DATA, work / name)
    from transformers import AutoTokenizer

    from job import rows

    shaped = rows.prepare(settings, report, None, AutoTokenizer.from_pretrained(MODEL_DIR), work / name)
    spec = train.prepare(settings, "unsloth", MODEL_DIR, shaped, work / name, str(work / "out" / name), name)
    callbacks = (StepProfiler(*profile, profile_dir or work),) if profile else ()
    metrics = train.train(spec, extra_callbacks=callbacks).as_dict()
    engine.free_memory()
    curve = metrics["loss_curve"]
    steps = metrics["steps"]
    result = {"name": name, "train": train_kw, "lora": lora_kw, "load_s": round(metrics["model_load_s"], 1),
              "s_per_step": round(metrics["train_seconds"] / steps, 3), **{k: metrics[k] for k in (
                  "steps", "train_tokens", "tokens_per_step", "steady_tokens_per_second", "peak_gpu_memory_gib", "batch_plan")},
              "curve": [(p["tokens"], round(p["loss"], 4)) for p in curve]}
    if callbacks:
        result["profile"] = callbacks[0].summary
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def loss_window(curve: list, lo: float, hi: float) -> float | None:
    window = [loss for tokens, loss in curve if lo <= tokens <= hi]
    return sum(window) / len(window) if window else None


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/sweep")
    report = data.validate_dataset(DATA, work)
    rows, results = report.accepted, {"card": torch.cuda.get_device_name(0), "variants": []}
    only = os.environ.get("SWEEP", "profile,budgets,guard").split(",")
    seed_steps = int(os.environ.get("GUARD_SEED_STEPS", "40"))

    def record(result: dict) -> None:
        results["variants"].append(result)
        (out / "sweep.json").write_text(json.dumps(results, indent=1))

    if "profile" in only:  # the default fast path; profile steps 6-8 after warm-up
        record(run_variant("fast-16k-profile", work, {"max_steps": 9}, profile=(6, 3),
                           profile_dir=out))
    if "guard" in only:
        # Equal tokens: the seed recipe's first seed_steps x 8 rows against fast runs that see the same rows.
        seed = run_variant("guard-seed", work, {"recipe": "seed", "max_steps": seed_steps})
        record(seed)
        seed_tokens = seed["train_tokens"]
        guards = [(label, budget, lr) for label, budget, lr in (("16k-lr-auto", 16384, None), ("32k-lr-auto", 32768, None),
                                                                ("16k-lr-2e-4", 16384, 2e-4)) if label in os.environ.get("GUARDS", label)]
        for label, budget, lr in guards:
            rows_per_step = 29 * budget // 16384  # ~558 tokens a row
            steps = max(2, round(seed_steps * 8 / rows_per_step))
            kw = {"max_steps": steps, "micro_batch_tokens": budget, **({"learning_rate": lr} if lr else {})}
            result = run_variant(f"guard-fast-{label}", work, kw)
            lo, hi = 0.75 * seed_tokens, seed_tokens * 1.05
            mine, ref = loss_window(result["curve"], lo, hi), loss_window(seed["curve"], lo, seed_tokens)
            result["loss_vs_seed_at_equal_tokens"] = (mine - ref) / ref if mine is not None and ref else None
            record(result)
    if "budgets" in only:  # step time against the token budget: fixed cost + cost per token
        for budget in (32768, 65536):  # checkpointing as `auto` decides (on for 64k)
            record(run_variant(f"fast-{budget // 1024}k", work,
                               {"max_steps": 12, "micro_batch_tokens": budget}))
        record(run_variant("fast-16k-gc-on", work, {"max_steps": 12},
                           {"gradient_checkpointing": "unsloth"}))
    print("SWEEP " + json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in results["variants"]]), flush=True)
    print(f"rows {rows}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
