"""Where a step's time goes on the job's default path (issue 31): torch.profiler over step 1 (recordings,
compiles, first allocations) and over three steady steps, on the anchor's Qwen3-0.6B shape and 3,000
learnable rows, through the job's own stages (rows.prepare, train.prepare, train.train).

    python bench/profile_steps.py OUTDIR      (after `gpu_anchor.py prepare`; the job imports Unsloth
                                              itself, so the plan's CUDA graphs are on)

Writes OUTDIR/profile.json (per window: wall and GPU-busy seconds a step, idle share, kernels a step, time by
kernel kind, the longest host gaps between kernels) and OUTDIR/<window>/profile.txt (top kernels and host calls).
The steady window is steps 120-122 of the 188 in one pass: by then the length-grouped order has met every padded
length, so no recording falls in it."""

import json
import os
import sys
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from gpu_bench import DATA, learnable_rows  # noqa: E402
from profiling import summarise  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from job import data, rows, train  # noqa: E402
from job.settings import Settings  # noqa: E402

# gpu_anchor.py prepare's model and rows; Unsloth is imported by the job's load, after the plan. The env overrides are
# for a smoke run on CPU (PROFILE_ENGINE=transformers, a tiny model, PROFILE_STEADY_AT=3).
MODEL_DIR = os.environ.get("PROFILE_MODEL", "/tmp/qwen3-0.6b-rand")
ENGINE = os.environ.get("PROFILE_ENGINE", "unsloth")
STEADY_AT = int(os.environ.get("PROFILE_STEADY_AT", "120"))
CUDA = torch.cuda.is_available()


class Windows(TrainerCallback):
    """A profiler over each (name, first step, steps) window of optimizer steps."""

    def __init__(self, windows: list[tuple[str, int, int]], out: Path):
        self.windows, self.out, self.active, self.summaries = windows, out, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        for name, start, count in self.windows:
            if state.global_step == start and self.active is None:
                sync()
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                  + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else []))
                profiler.__enter__()
                self.active = (name, start + count, count, profiler, time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if self.active is None or state.global_step < self.active[1]:
            return
        name, _, count, profiler, started = self.active
        sync()
        wall = time.perf_counter() - started
        profiler.__exit__(None, None, None)
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.summaries[name] = summarise(profiler, wall, count, folder)
        except Exception as error:  # a summary bug must not lose the run
            self.summaries[name] = {"error": repr(error), "wall_s": wall}
        self.active = None


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    source = out / "learnable.jsonl"
    source.write_text(learnable_rows(Path(os.environ.get("PROFILE_DATA", DATA))))
    settings = Settings(dataset_uri=str(source), output_uri=str(out / "runs"), work_dir=out / "work", engine=ENGINE,
                        train={"epochs": 1})
    work = out / "work" / "profile"
    report = data.validate_dataset(source, work)
    shaped = rows.prepare(settings, report, None, AutoTokenizer.from_pretrained(MODEL_DIR), work)
    spec = train.prepare(settings, ENGINE, MODEL_DIR, shaped, work, str(out / "runs" / "profile"), "profile")
    windows = Windows([("step-1", 0, 1), ("steady", STEADY_AT, 3)], out)
    metrics = train.train(spec, extra_callbacks=(windows,))
    result = {"batch_plan": metrics.batch_plan, "memory_fit": metrics.memory_fit, "steady_tokens_per_second": metrics.steady_tokens_per_second,
              "first_step_at_s": metrics.first_step_at_s, "model_load_s": metrics.model_load_s, "windows": windows.summaries}
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
