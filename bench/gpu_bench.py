"""GPU benchmark: the seed tutorial's recipe (gpu_anchor.py, mode `unsloth`) against the
job's own training paths, on one card in one call, same synthetic data and model.

    python bench/gpu_bench.py OUTDIR        (on the GPU machine; STEPS_ANCHOR, FAST_STEPS override)

Prints a table and writes OUTDIR/bench.json. Every job run is the real `python -m job`
against a local S3 server (moto), with the anchor's Qwen3-0.6B-shaped random model."""

import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 FLOP/s
FLOP_PER_TOKEN = 2.8e9  # Qwen3-0.6B at 1k-token documents, 6N + attention convention (gpu.md)
MODEL_DIR, DATA = "/tmp/qwen3-0.6b-rand", "/tmp/sft.jsonl"
# Short answers mixed into the random-word rows: the verify gate needs something a random
# model can learn to answer and end within a few steps; random-word answers never end.
FACTS = [("What is the 6G latency target?", "About 0.1 ms."), ("What does RIS steer?", "Radio waves."),
         ("Who runs xApps?", "The RIC."), ("What is the 6G peak rate goal?", "One terabit per second.")]


def learnable_rows(source: Path) -> str:
    """3,000 rows as long as the anchor's (its random words become the context) whose answers a
    random model can learn within a run: one of four short sentences, then end-of-turn."""
    lines = []
    for i, line in enumerate(source.read_text().splitlines()):
        row, k = json.loads(line), i % len(FACTS)
        lines.append(json.dumps({"instruction": f"{row['instruction']} {row['output']}\n{FACTS[k][0]}", "output": FACTS[k][1]}))
    return "\n".join(lines) + "\n"


def sh(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    return code, time.perf_counter() - started


def loss_at(curve: list[dict], lo: float, hi: float) -> float | None:
    """Mean training loss over the logged steps whose cumulative tokens fall in [lo, hi]."""
    window = [p["loss"] for p in curve if lo <= p["tokens"] <= hi]
    return sum(window) / len(window) if window else None


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    results: dict = {"card": _card(), "versions": _versions()}

    code, secs = sh([sys.executable, str(HERE / "gpu_anchor.py"), "prepare", str(out)], env, out / "prepare.log")
    assert code == 0, (out / "prepare.log").read_text()[-3000:]
    import boto3

    sys.path.insert(0, str(REPO))
    from job.demo import start_local_s3

    server, aws = start_local_s3()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    rows = Path(DATA).read_text().splitlines()
    rows += [json.dumps({"instruction": q, "output": a}) for q, a in FACTS] * 25  # 3,000 + 100 rows
    s3.put_object(Bucket="bench", Key="data/train.jsonl", Body=("\n".join(rows) + "\n").encode())
    s3.put_object(Bucket="bench", Key="data/learnable.jsonl", Body=learnable_rows(Path(DATA)).encode())

    # 50 steps: two GPUs take 56 rows a step, so 55 steps finish the first epoch, whose last,
    # shorter batch is a new shape; the scaling pair stays inside one epoch.
    fast_steps = os.environ.get("FAST_STEPS", "50")
    ddp2 = {"QLORA_TRAIN__MAX_STEPS": fast_steps, "QLORA_NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    # One GPU takes twice the steps of two, so both runs cover the same share of the epoch: batches of
    # similar lengths, the same tokens a card a step (runs 8-13 compared 50 against 50 steps, and the
    # two-GPU window held ~8% more tokens a card a step, which flattered the scaling).
    one_gpu_steps = os.environ.get("ONE_GPU_STEPS", str(2 * int(fast_steps)))
    def fresh_pod(name: str) -> dict:  # a new pod's empty local caches (the anchor warms the machine's defaults)
        return {"TORCHINDUCTOR_CACHE_DIR": f"/tmp/pod-{name}/inductor", "TRITON_CACHE_DIR": f"/tmp/pod-{name}/triton",
                "UNSLOTH_COMPILE_LOCATION": f"/tmp/pod-{name}/unsloth_compiled_cache"}

    variants = {
        # name: settings on top of the defaults
        "job_fast": {"QLORA_TRAIN__MAX_STEPS": one_gpu_steps},
        "job_seed": {"QLORA_TRAIN__RECIPE": "seed", "QLORA_TRAIN__MAX_STEPS": os.environ.get("SEED_STEPS", "20")},
        "job_fast_32k": {"QLORA_TRAIN__MICRO_BATCH_TOKENS": "32768", "QLORA_TRAIN__MAX_STEPS": str(max(4, int(fast_steps) // 2))},
        "job_packed_16k": {"QLORA_TRAIN__PACKING": "true", "QLORA_TRAIN__MAX_STEPS": fast_steps},
        # The 3,000-row end-to-end target: same lengths as the anchor's rows, answers a model can learn.
        "job_e2e": (e2e := {"QLORA_DATASET_URI": "s3://bench/data/learnable.jsonl", "QLORA_VERIFY__PROMPTS": "[]",
                            "QLORA_VERIFY__TRAIN_PROBES": "3", **fresh_pod("job_e2e")}),
        # A fresh pod of a node that has run the job before: empty local compile caches (Inductor, Triton,
        # Unsloth's generated modules), the compile cache job_e2e stored under the output prefix (same data and
        # settings, so retraining's skip is off).
        "job_e2e_warm": {**e2e, **fresh_pod("job_e2e_warm"), "QLORA_RETRAIN__SKIP_UNCHANGED": "false"},
        # One pass over the 3,000 rows (the end-to-end target as first set, before runs were sized in epochs).
        "job_e2e_1ep": (one_pass := {**e2e, **fresh_pod("job_e2e_1ep"), "QLORA_TRAIN__EPOCHS": "1"}),
        "job_e2e_1ep_warm": {**one_pass, **fresh_pod("job_e2e_1ep_warm"), "QLORA_RETRAIN__SKIP_UNCHANGED": "false"},
        # Lengths padded to 256 instead of 128: fewer batch shapes to record graphs for, more padding a step.
        "job_e2e_1ep_pad256": {**one_pass, **fresh_pod("job_e2e_1ep_pad256"), "QLORA_TRAIN__PAD_TO_MULTIPLE_OF": "256",
                               "QLORA_RETRAIN__SKIP_UNCHANGED": "false"},
        # Without the per-block CUDA graphs (the default before run 30), for the same pass.
        "job_e2e_1ep_no_graphs": {**one_pass, **fresh_pod("job_e2e_1ep_no_graphs"), "QLORA_TRAIN__CUDA_GRAPHS": "false",
                                  "QLORA_TRAIN__COMPILE_CACHE": "false"},
        # DDP scaling: job_fast's settings on two GPUs (one worker per GPU, torchrun's launcher).
        "job_ddp2": ddp2,
        # job_ddp2 again: it meets the same batches, so every kernel it needs is in the compile caches.
        "job_ddp2_after": ddp2,
        # job_fast again after the DDP runs: the one-GPU figure brackets them (drift, a noisy first run).
        "job_fast_after": {"QLORA_TRAIN__MAX_STEPS": one_gpu_steps},
        # Unsloth's Triton fused linear cross-entropy, which the job turns off (job/engine.py): its
        # kernels specialise on the count of trained tokens (divisible by 16 or not), and each new case
        # compiles for ~1 s in the middle of training, on each card (runs 11-13).
        "job_fast_fused": {"QLORA_TRAIN__MAX_STEPS": fast_steps, "UNSLOTH_FUSED_LINEAR": "1"},
        # The loss reduced (a device sync, a collective under DDP) every 10th step instead of every step:
        # is that part of the ~50 ms a DDP step costs over one GPU (run 13)? Not run yet.
        "job_fast_log10": {"QLORA_TRAIN__MAX_STEPS": one_gpu_steps, "QLORA_TRAIN__LOGGING_STEPS": "10"},
        "job_ddp2_log10": {**ddp2, "QLORA_TRAIN__LOGGING_STEPS": "10"},
        # One GPU with the torch threads a worker gets when two share the machine (job/distributed.py):
        # does the training process lose anything by it?
        "job_fast_half_threads": (half_threads := {"QLORA_TRAIN__MAX_STEPS": one_gpu_steps,
                                                   "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2))}),
        "job_fast_half_threads_after": half_threads,
        # Two workers with torch's default of one thread a core each, as before the job set OMP_NUM_THREADS.
        "job_ddp2_all_threads": {**ddp2, "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},
        # Where else the DDP step's extra ~50 ms of host time may go (bench/diag_sitecustomize.py):
        # the reducer's per-weight gradient copies, Dynamo's graph splits at DDP bucket boundaries.
        "job_ddp2_bucket_view": {**ddp2, "BENCH_DDP_BUCKET_VIEW": "1"},
        "job_ddp2_no_optimize_ddp": {**ddp2, "BENCH_NO_OPTIMIZE_DDP": "1"},
    }
    job_pythonpath = os.environ.get("PYTHONPATH", "")
    # First in every job process, before anything imports torch; it acts only on the variables set:
    # DIAG=1 for diagnostics (recompiles, Triton compiles, batch shapes, per-step counters in each
    # job log), BENCH_* for the DDP experiments of the variants above.
    hook_code = [(HERE / "diag_sitecustomize.py").read_text()]
    results["diag"] = bool(os.environ.get("DIAG"))
    if os.environ.get("SDPA_NO_CUDNN"):
        # Experiment: the job's processes (workers too) start with cuDNN attention off, so SDPA uses
        # its flash / memory-efficient kernels; each process notes at exit whether it stayed off.
        hook_code.append(
            "import atexit, os, torch\ntorch.backends.cuda.enable_cudnn_sdp(False)\n"
            f"atexit.register(lambda: open('{out}/sdpa-' + str(os.getpid()) + '.txt', 'w')"
            ".write(str(torch.backends.cuda.cudnn_sdp_enabled())))\n")
        results["sdpa"] = "cudnn off (SDPA_NO_CUDNN)"
    hook = out / "job-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text("\n".join(hook_code))
    job_pythonpath = f"{hook}:{job_pythonpath}"
    gpu0 = {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("BENCH_GPU", "0")}

    def job_env(name: str, extra: dict) -> dict:
        return {
            **{k: v for k, v in gpu0.items() if not k.startswith("QLORA_")}, **aws,
            "QLORA_DATASET_URI": "s3://bench/data/train.jsonl", "QLORA_OUTPUT_URI": "s3://bench/runs",
            "QLORA_MODEL__NAME": MODEL_DIR, "QLORA_RUN_ID": name, "QLORA_WORK_DIR": f"/tmp/work-{name}",
            "QLORA_TERMINATION_LOG": str(out / f"{name}.termination"), "QLORA_LOG_FORMAT": "json",
            "QLORA_VERIFY__PROMPTS": json.dumps([{"prompt": q} for q, _ in FACTS[:2]]), "QLORA_VERIFY__TRAIN_PROBES": "0",
            "QLORA_VERIFY__MAX_NEW_TOKENS": "32", "PYTHONPATH": job_pythonpath, **extra,
        }

    def record(name: str, code: int, secs: float) -> None:
        metrics_path = Path(f"/tmp/work-{name}/{name}/publish/metrics.json")
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        results[name] = {"exit": code, "wall_s": round(secs, 1), **{k: v for k, v in metrics.items() if k != "data"}}
        print(f"{name}: exit {code} in {secs:.1f} s", flush=True)
        (out / "bench.json").write_text(json.dumps(results, indent=1))  # partial results survive a time-out

    sweep = None
    if os.environ.get("SWEEP_GPU"):  # the in-process sweep (gpu_sweep.py) on another card, alongside
        sweep = subprocess.Popen([sys.executable, str(HERE / "gpu_sweep.py"), str(out / "sweep")], cwd=REPO,
                                 env={**env, "CUDA_VISIBLE_DEVICES": os.environ["SWEEP_GPU"]},
                                 stdout=open(out / "sweep.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115 (open while it runs)
    anchor_steps = os.environ.get("STEPS_ANCHOR", "25")
    code, secs = sh([sys.executable, str(HERE / "gpu_anchor.py"), "unsloth", str(out)], {**gpu0, "STEPS": anchor_steps}, out / "anchor.log")
    results["anchor"] = json.loads((out / "unsloth.json").read_text()) if code == 0 else {"exit": code}
    results["anchor"]["wall_s"] = round(secs, 1)

    # VARIANTS picks runs and their order (interleave A, B, A, B to see drift); default: all, as listed.
    for name in os.environ.get("VARIANTS", ",".join(variants)).split(","):
        extra = variants[name]
        if name.startswith("job_ddp") and sweep is not None and sweep.poll() is None:
            sweep.wait()  # DDP needs both cards
        code, secs = sh([sys.executable, "-m", "job"], job_env(name, extra), out / f"{name}.log")
        record(name, code, secs)
    server.stop()
    if sweep is not None:
        sweep.wait()
    _report(results, out)


def _report(results: dict, out: Path) -> None:
    anchor = results["anchor"]
    base = anchor.get("tok_per_s_steady") or 0
    seed_curve = results.get("job_seed", {}).get("loss_curve", [])
    seed_end = seed_curve[-1]["tokens"] if seed_curve else 0
    rows = [("anchor (seed, gpu_anchor.py unsloth)", base, anchor.get("tok_per_step"), anchor.get("peak_mem_gib"),
             anchor.get("load_s"), anchor.get("wall_s"), None, None)]
    for name, r in results.items():
        if not name.startswith("job_"):
            continue
        gap = None
        if seed_curve and r.get("loss_curve") and name != "job_seed":
            lo, hi = 0.75 * seed_end, seed_end
            mine, ref = loss_at(r["loss_curve"], lo, hi), loss_at(seed_curve, lo, hi)
            gap = (mine - ref) / ref if mine is not None and ref else None
            r["loss_vs_seed_at_equal_tokens"] = gap
        rows.append((f"{name} (exit {r['exit']})", r.get("steady_tokens_per_second"), r.get("tokens_per_step"),
                     r.get("peak_gpu_memory_gib"), r.get("model_load_s"), r["wall_s"], gap, r.get("batch_plan")))
    lines = [f"card: {results['card']}", f"versions: {json.dumps(results['versions'])}", "",
             "| run | steady tok/s | x seed | tok/step | peak GiB | load s | wall s | util % | loss vs seed @ equal tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, tps, per_step, peak, load, wall, gap, _ in rows:
        ratio = f"{tps / base:.2f}" if tps and base else "-"
        util = f"{100 * tps * FLOP_PER_TOKEN / PEAK_BF16:.1f}" if tps else "-"
        lines.append(f"| {name} | {round(tps) if tps else '-'} | {ratio} | {per_step or '-'} | {peak or '-'} | "
                     f"{round(load, 1) if load else '-'} | {wall or '-'} | {util} | {f'{gap:+.2%}' if gap is not None else '-'} |")
    lines += ["", "| run | median step s | slowest steps (step: s) | steps > 1.5x median |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        times = r.get("step_seconds") if isinstance(r, dict) else None
        if times:
            median = sorted(times)[len(times) // 2]
            slowest = sorted(range(len(times)), key=lambda i: -times[i])[:3]
            lines.append(f"| {name} | {median:.3f} | {', '.join(f'{i + 1}: {times[i]:.2f}' for i in slowest)} | "
                         f"{sum(t > 1.5 * median for t in times)} |")
    # (result key, two-GPU run, its one-GPU runs)
    pairs = (("ddp_scaling", "job_ddp2", ("job_fast", "job_fast_after")),
             ("ddp_scaling_second_run", "job_ddp2_after", ("job_fast", "job_fast_after")),
             ("ddp_scaling_log10", "job_ddp2_log10", ("job_fast_log10",)),
             ("ddp_scaling_all_threads", "job_ddp2_all_threads", ("job_fast", "job_fast_after")),
             ("ddp_scaling_bucket_view", "job_ddp2_bucket_view", ("job_fast", "job_fast_after")),
             ("ddp_scaling_no_optimize_ddp", "job_ddp2_no_optimize_ddp", ("job_fast", "job_fast_after")))
    for key, name, singles in pairs:
        two_run, one_runs = results.get(name, {}), [results[n] for n in singles if n in results]
        ones = [v for r in one_runs if (v := r.get("steady_tokens_per_second"))]
        two = two_run.get("steady_tokens_per_second")
        if ones and two:
            one = sum(ones) / len(ones)
            lines.append(f"\nDDP scaling, {name} (2 GPUs) / mean of {', '.join(singles)} (1 GPU: "
                         f"{', '.join(str(round(v)) for v in ones)}), steady tok/s: {two / one:.2f}x")
            results[key] = round(two / one, 3)
        # The same share of the epoch: the last 80% of each run's steps, one GPU running twice the steps.
        two_w = window_tokens_per_second(two_run)
        ones_w = [v for r in one_runs if len(r.get("step_seconds") or []) == 2 * len(two_run.get("step_seconds") or [None])
                  and (v := window_tokens_per_second(r))]
        if two_w and ones_w:
            one_w = sum(ones_w) / len(ones_w)
            lines.append(f"DDP scaling over the same share of the epoch (last 80% of steps, one GPU twice the steps): "
                         f"{round(two_w)} / {round(one_w)} tok/s = {two_w / one_w:.2f}x")
            results[key + "_matched"] = round(two_w / one_w, 3)
    table = "\n".join(lines)
    print(table)
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    # What gets committed: bench/raw/results-DATE-CARD-runN.json.xz (a few KB; the plain JSON is ~25 KB a run).
    (out / "results.json.xz").write_bytes(lzma.compress(json.dumps(results, separators=(",", ":")).encode(), preset=9))
    append_summary(results, HERE / "summary.json", out / "summary.json")


def append_summary(results: dict, *paths: Path) -> dict:
    """One line a call in bench/summary.json (newest last; also written to OUTDIR to bring back): the headline
    figures of issue 19. default = job_fast's steady tok/s; e2e = job_e2e's wall; cold start = job_e2e's
    process start to the end of its first optimizer step (imports, model load, set-up, first compile)."""
    import datetime

    def first(*names: str) -> tuple[str | None, dict]:  # the first of these runs this call made that trained
        return next(((name, results[name]) for name in names if results.get(name, {}).get("steps")), (None, {}))

    # default: job_fast (random-word rows), else the learnable rows of the same lengths at the default settings;
    # e2e and cold start: the run on a node that has run the job before (compile cache stored), when made
    default_run, fast = first("job_fast", "job_e2e", "job_e2e_1ep")
    e2e_run, e2e = first("job_e2e_warm", "job_e2e", "job_e2e_1ep_warm", "job_e2e_1ep")
    anchor, default = results["anchor"].get("tok_per_s_steady"), fast.get("steady_tokens_per_second")
    entry = {"date": datetime.date.today().isoformat(), "card": results["card"], "anchor_tok_s": anchor, "default_tok_s": default,
             "ratio": round(default / anchor, 2) if default and anchor else None, "e2e_s": e2e.get("wall_s"),
             "cold_start_s": e2e.get("first_step_at_s"), "ddp_scaling_matched": results.get("ddp_scaling_matched"),
             "default_run": default_run, "e2e_run": e2e_run, "e2e_epochs": e2e.get("epochs_trained"),
             "cold_start_parts_s": {"load_stage": (e2e.get("timings") or {}).get("load_s"), "model_load": e2e.get("model_load_s"),
                                    "first_step": (e2e.get("step_seconds") or [None])[0]} if e2e else None}
    summary = json.loads(paths[0].read_text()) if paths[0].exists() else []
    for path in paths:
        path.write_text(json.dumps([*summary, entry], indent=1) + "\n")
    return entry


def window_tokens_per_second(run: dict, skip: float = 0.2) -> float | None:
    """Tokens/s from the first logged step after the first `skip` share of a run to its last logged
    step, from the loss curve's token counts and the per-step times (any logging interval)."""
    times, curve = run.get("step_seconds"), run.get("loss_curve")
    if not times or not curve:
        return None
    points = [p for p in curve if p["step"] >= max(1, round(skip * len(times)))]
    if len(points) < 2:
        return None
    first, last = points[0], points[-1]
    return (last["tokens"] - first["tokens"]) / sum(times[first["step"]:last["step"]])


def _card() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"


def _versions() -> dict:
    from importlib import metadata

    names = ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "bitsandbytes", "datasets", "accelerate")
    found = {}
    for n in names:
        try:
            found[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            found[n] = None
    return found


if __name__ == "__main__":
    main(Path(sys.argv[1]))
