"""Any model on any card (issue 30), on the GPU machine, in at most three calls:

    python3 bench/gpu_sizes.py probe OUT    # seed anchor; 0.6B, 4B and 8B shapes built; memory_probe.py on each
    CELLS=8b@24,4b@48,0.6b@78:full ANCHORS=0.6b,8b python3 bench/gpu_sizes.py matrix OUT
                                            # the job's defaults with 24, 48 or 78 GiB free (a balloon process holds
                                            # the rest of the card), and the seed recipe on each shape
    python3 bench/gpu_sizes.py summarise OUT/sizes.json "runs 38"
                                            # (here) its line in bench/summary.json; README's measured table from them

Shapes: Qwen3's published config values with random bf16 weights and the anchor's tokenizer (built by
`gpu_anchor.py prepare`). Each call writes OUT/<name>.json and OUT/sizes.json with everything."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ANCHOR_MODEL = "/tmp/qwen3-0.6b-rand"
# Qwen3-4B and Qwen3-8B config.json values (hidden, intermediate, layers, heads, KV heads, tied embeddings).
SHAPES = {"0.6b": None, "4b": (2560, 9728, 36, 32, 8, True), "8b": (4096, 12288, 36, 32, 8, False)}
BUDGET_S = float(os.environ.get("BUDGET_S", "530"))
STARTED = time.monotonic()


def model_dir(shape: str) -> str:
    return ANCHOR_MODEL if shape == "0.6b" else f"/tmp/qwen3-{shape}-rand"


def sh(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})},
                                   timeout=timeout)
        except subprocess.TimeoutExpired:
            code = 124
    return code, round(time.perf_counter() - started, 1)


def left() -> float:
    return BUDGET_S - (time.monotonic() - STARTED)


def build_shape(shape: str) -> None:
    """Random bf16 weights in Qwen3's published shape, the anchor's tokenizer beside them."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    hidden, intermediate, layers, heads, kv, tied = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(ANCHOR_MODEL)
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(model_dir(shape))
    tokenizer.save_pretrained(model_dir(shape))
    del model
    torch.cuda.empty_cache()


def anchor(out: Path, shape: str, steps: str) -> dict:
    """gpu_anchor.py unchanged: its model folder is the anchor's constant, so another shape is put there first."""
    moved = None
    if shape != "0.6b":
        moved = ANCHOR_MODEL + "-orig"
        os.replace(ANCHOR_MODEL, moved)
        os.symlink(model_dir(shape), ANCHOR_MODEL)
    try:
        code, secs = sh([sys.executable, str(HERE / "gpu_anchor.py"), "unsloth", str(out)], out / f"anchor-{shape}.log",
                        {"STEPS": steps})
        result = json.loads((out / "unsloth.json").read_text()) if code == 0 else {"exit": code}
        (out / "unsloth.json").unlink(missing_ok=True)
    finally:
        if moved:
            os.unlink(ANCHOR_MODEL)
            os.replace(moved, ANCHOR_MODEL)
    return {**result, "shape": shape, "seconds": secs}


def probe(out: Path) -> dict:
    results: dict = {"anchor": [], "probes": [], "builds": {}}
    code, secs = sh([sys.executable, str(HERE / "gpu_anchor.py"), "prepare", str(out)], out / "prepare.log")
    assert code == 0, (out / "prepare.log").read_text()[-3000:]
    results["anchor"].append(anchor(out, "0.6b", "25"))
    print("anchor", results["anchor"][-1], flush=True)
    for shape in ("4b", "8b"):
        started = time.perf_counter()
        build_shape(shape)
        results["builds"][shape] = round(time.perf_counter() - started, 1)
        print("built", shape, results["builds"][shape], flush=True)
    # (shape, checkpointing, graphs, sizes) in the order they matter; skipped once the budget runs low.
    plan = [("0.6b", 0, 0, "16x256,16x576,16x1024,16x2048"), ("0.6b", 1, 0, "16x256,16x576,16x1024,16x2048"),
            ("8b", 1, 0, "16x256,16x576,16x1024,16x2048"), ("4b", 1, 0, "16x256,16x576,16x1024,16x2048"),
            ("4b", 0, 0, "16x256,16x576,16x1024"), ("8b", 0, 0, "16x256,16x576,16x1024"),
            ("0.6b", 0, 1, "16x384,16x512,16x640,16x768,16x896,16x1024"), ("0.6b", 1, 1, "16x384,16x512,16x640,16x768,16x896,16x1024"),
            ("4b", 1, 1, "16x384,16x512,16x640,16x768")]
    for shape, gc, graphs, sizes in plan:
        if left() < 75:
            results["probes"].append({"shape": shape, "gc": gc, "graphs": graphs, "skipped": "budget"})
            continue
        name = f"probe-{shape}-gc{gc}-g{graphs}"
        code, secs = sh([sys.executable, str(HERE / "memory_probe.py"), model_dir(shape), str(out / f"{name}.json"),
                         "--gc", str(gc), "--graphs", str(graphs), "--sizes", sizes], out / f"{name}.log", timeout=max(60, left() - 20))
        entry = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
        results["probes"].append({"shape": shape, "gc": gc, "graphs": graphs, "exit": code, "seconds": secs, **entry})
        print(name, code, secs, json.dumps(entry.get("sizes")), flush=True)
    return results


LENGTH_SETTINGS = ("QLORA_TRAIN__EPOCHS", "QLORA_TRAIN__MAX_STEPS")


def length_label(settings: dict) -> str:
    """How long a cell trained: "N epochs", "N steps", or "default" (the job's own length)."""
    if "QLORA_TRAIN__EPOCHS" in settings:
        return f"{settings['QLORA_TRAIN__EPOCHS']} epochs"
    if "QLORA_TRAIN__MAX_STEPS" in settings:
        return f"{settings['QLORA_TRAIN__MAX_STEPS']} steps"
    return "default"


def summary_entry(sizes: dict, date: str, runs: str) -> dict:
    """A matrix call's line in bench/summary.json: every cell as {model, free_gib, exit, steady_tok_s, peak_gib,
    seed_tok_s} (the seed recipe on that shape in the same call) plus the plan's estimates and choices."""
    seed = {a["shape"]: a["tok_per_s_steady"] for a in sizes["anchor"] if a.get("tok_per_s_steady")}  # gpu_anchor.py's name
    cells = [{"model": c["model"], "free_gib": c["free_gib"], "exit": c.get("exit", c.get("skipped")),
              "steady_tok_s": c.get("steady_tok_s"), "peak_gib": c.get("peak_gib"), "seed_tok_s": seed.get(c["model"]),
              "job_seconds": c.get("job_seconds"), "first_step_at_s": c.get("first_step_at_s"), "stages": c.get("stages"),
              "estimated_peak_gib": c.get("estimated_peak_gib"), "train_seconds": c.get("train_seconds"),
              "estimated_train_seconds": c.get("estimated_train_seconds"), "steps": c.get("steps"),
              "gradient_checkpointing": c.get("chose", {}).get("gradient_checkpointing"),
              "cuda_graphs": c.get("chose", {}).get("cuda_graphs"), "micro_batch_tokens": c.get("chose", {}).get("micro_batch_tokens"),
              "length": length_label(c.get("settings", {})),
              "variant": {k: v for k, v in c.get("settings", {}).items() if k not in LENGTH_SETTINGS} or None}
             for c in sizes["matrix"]]
    # The headline figures (issue 31) come from the default-size run that went to the end, when the call had one.
    e2e = next((c for c in cells if c["model"] == "0.6b" and c["length"] == "default" and c["exit"] == 0 and not c["variant"]), {})
    default = e2e.get("steady_tok_s")
    return {"date": date, "card": sizes["card"], "anchor_tok_s": seed.get("0.6b"), "default_tok_s": default,
            "ratio": round(default / seed["0.6b"], 2) if default and seed.get("0.6b") else None, "e2e_s": e2e.get("job_seconds"),
            "cold_start_s": e2e.get("first_step_at_s"), "ddp_scaling_matched": None, "matrix": cells,
            "seed_tok_s_by_shape": seed, "runs": runs}


def readme_table(summary: list[dict]) -> str:
    """README "Measured" table: the newest finished cell of each model and free memory in bench/summary.json."""
    newest: dict = {}
    for entry in summary:
        for c in entry.get("matrix", []):
            if c.get("steady_tok_s") and c.get("peak_gib") and not c.get("variant"):
                newest[(c["model"], c["free_gib"])] = {**c, "card": entry["card"].replace("NVIDIA ", "").split(" 80GB")[0]}
    models = sorted({m for m, _ in newest}, key=float_size)
    frees = sorted({f for _, f in newest})
    lines = ["| model shape | " + " | ".join(f"{f:.0f} GiB free" for f in frees) + " |", "| --- |" + " --- |" * len(frees)]
    for model in models:
        lines.append(f"| {model.upper()} | " + " | ".join(readme_cell(newest.get((model, free))) for free in frees) + " |")
    return "\n".join(lines)


def readme_cell(c: dict | None) -> str:
    """One measured cell: how it ended, steady tok/s (x the seed recipe), peak, what ran, the card; "-" if none."""
    if c is None:
        return "-"
    how = f"{c['steps']} steps" if c["exit"] == "stopped after training" else f"exit {c['exit']}"
    ratio = f" ({c['steady_tok_s'] / c['seed_tok_s']:.1f}x seed)" if c.get("seed_tok_s") else ""
    ran = "ckpt" if c.get("ran_with_checkpointing", c["gradient_checkpointing"]) else "no ckpt"
    return (f"{how}, {c['steady_tok_s'] / 1000:.1f}k tok/s{ratio}, {c['peak_gib']:.1f} GiB, {ran}"
            f"{', graphs' if c['cuda_graphs'] else ''}, {c['card']}")


def results_rows(entry: dict) -> str:
    """bench/RESULTS.md's table of a matrix call: every cell's figures beside the plan's estimates."""
    def pct(measured, estimated):
        return f" ({estimated} est., {100 * (estimated / measured - 1):+.0f}%)" if measured and estimated else ""

    lines = ["| cell | exit | steps | steady tok/s | x seed | peak GiB | train s | chose | step 1 ends at s | job s |",
             "| --- |" + " --- |" * 9]
    for c in entry["matrix"]:
        ratio = f"{c['steady_tok_s'] / c['seed_tok_s']:.2f}" if c.get("steady_tok_s") and c.get("seed_tok_s") else "-"
        chose = (f"{'ckpt' if c['gradient_checkpointing'] else 'no ckpt'}{', graphs' if c['cuda_graphs'] else ''}, "
                 f"{c['micro_batch_tokens']} tok" if c.get("micro_batch_tokens") else "-")
        variant = "; " + ", ".join(f"{k}={v}" for k, v in c["variant"].items()) if c.get("variant") else ""
        lines.append(f"| {c['model']} @ {c['free_gib']:.0f} GiB, {c['length']}{variant} | {c['exit']} | {c.get('steps') or '-'} | "
                     f"{c.get('steady_tok_s') or '-'} | {ratio} | {c.get('peak_gib') or '-'}{pct(c.get('peak_gib'), c.get('estimated_peak_gib'))} | "
                     f"{c.get('train_seconds') or '-'}{pct(c.get('train_seconds'), c.get('estimated_train_seconds'))} | {chose} | "
                     f"{c.get('first_step_at_s') or '-'} | {c.get('job_seconds') or '-'} |")
    return "\n".join(lines)


def float_size(model: str) -> float:
    return float(model.rstrip("bB"))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "summarise":  # on this machine, after a call: append its line, print the README table
        entry = summary_entry(json.loads(out.read_text()), time.strftime("%Y-%m-%d"), sys.argv[3])
        path = HERE / "summary.json"
        summary = [*json.loads(path.read_text()), entry]
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(readme_table(summary) + "\n\n" + results_rows(entry))
        return
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from gpu_bench import _versions  # this script's folder is on sys.path when it runs

    results = {"mode": mode, "card": torch.cuda.get_device_name(0), "versions": _versions(),
               **(probe(out) if mode == "probe" else matrix(out))}
    (out / "sizes.json").write_text(json.dumps(results, indent=1))
    for log in out.glob("*.log"):  # the files that come back are few: keep the logs' tails in one file
        with open(out / "logs.txt", "a") as f:
            f.write(f"==== {log.name}\n" + "".join(log.read_text(errors="replace").splitlines(True)[-40:]))
        log.unlink()
    for extra in out.glob("probe-*.json"):
        extra.unlink()
    shutil.rmtree(out / "tmp", ignore_errors=True)


def balloon(free_gib: float):
    """A process holding all but `free_gib` of the card (plus what the job's own CUDA context takes), so the job's
    torch.cuda.mem_get_info sees about free_gib free: a smaller card on this one."""
    code = ("import sys, time, torch; free, _ = torch.cuda.mem_get_info(); keep = int((float(sys.argv[1]) + 0.5) * 2**30); "
            "x = torch.empty(max(0, free - keep), dtype=torch.uint8, device='cuda'); print('ready', flush=True); time.sleep(3600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(free_gib)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def job_run(out: Path, name: str, shape: str, free_gib: float, settings: dict, aws: dict, to_the_end: bool) -> dict:
    """`python -m job` on a shape with free_gib of the card free. Cut short (to_the_end False): stopped once its
    "training finished" line is logged (verify and publish would load the model again to say exit 4: random weights
    learn little in a few steps). The figures come from its JSON log lines."""
    held = balloon(free_gib)
    log_path = out / f"{name}.log"
    started = time.perf_counter()
    try:
        seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info()[0] / 2**30)"],
                              capture_output=True, text=True).stdout.strip()
        env = {**os.environ, **aws, "QLORA_DATASET_URI": "s3://bench/data/learnable.jsonl", "QLORA_OUTPUT_URI": f"s3://bench/{name}",
               "QLORA_MODEL__NAME": model_dir(shape), "QLORA_RUN_ID": name, "QLORA_WORK_DIR": "/tmp/work",
               "QLORA_MODEL__CACHE_DIR": "/tmp/models", "QLORA_LOG_FORMAT": "json", "QLORA_VERIFY__PROMPTS": "[]",
               "QLORA_VERIFY__TRAIN_PROBES": "3", **settings}
        code, stopped = None, False
        with open(log_path, "w") as log:
            job_started = time.perf_counter()  # the job's own wall: fetch to manifest when it runs to the end
            job = subprocess.Popen([sys.executable, "-m", "job"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=env, text=True)
            deadline = time.monotonic() + max(60, left() - 15)
            for line in job.stdout:
                log.write(line)
                if (not to_the_end and '"training finished"' in line) or time.monotonic() > deadline:
                    stopped = '"training finished"' in line
                    job.kill()
                    break
            code = job.wait()
            job_seconds = round(time.perf_counter() - job_started, 1)
            code = "stopped after training" if stopped else (124 if code < 0 else code)
    finally:
        held.kill()
        held.wait()
    events, stages = {}, {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.setdefault(record["event"], record)
            if record["event"] == "stage finished":
                stages[record.get("stage")] = record.get("seconds")
    fitted, finished = events.get("plan fitted to this card", {}), events.get("training finished", {})
    result = {"name": name, "model": shape, "free_gib": free_gib, "free_gib_seen": float(seen or 0), "exit": code,
              "seconds": round(time.perf_counter() - started, 1), "job_seconds": job_seconds, "settings": settings,
              "steady_tok_s": finished.get("steady_tokens_per_s"), "peak_gib": finished.get("peak_gpu_memory_gib"),
              "estimated_peak_gib": fitted.get("peak_gpu_memory_gib"), "train_seconds": finished.get("train_seconds"),
              "estimated_train_seconds": finished.get("estimated_train_seconds"), "steps": finished.get("steps"),
              "first_step_at_s": finished.get("first_step_at_s"), "loss_first": finished.get("loss_first"),
              "loss_last": finished.get("loss_last"),
              "chose": {k: fitted.get(k) for k in ("per_device_batch_size", "gradient_accumulation_steps", "micro_batch_tokens",
                                                   "gradient_checkpointing", "cuda_graphs", "longest_row_tokens", "budget_gib")},
              "stages": stages,
              "error": next((line for line in reversed(log_path.read_text(errors="replace").splitlines())
                             if "qlora-job: error" in line), None)}
    print(json.dumps(result), flush=True)
    return result


def matrix(out: Path) -> dict:
    """CELLS=shape@free[:length][;QLORA_X=value],...: the job's defaults (or a variant) with `free` GiB of the card
    free. length: absent, STEPS steps
    cut short after training; eN, N epochs of the learnable rows cut short after training; full, the default length
    (3 epochs) to the end (exit 0: verified and published). ANCHORS=0.6b,4b,8b: the seed recipe on each shape, first.
    A warm machine keeps the prepared data and the built shapes between calls."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import boto3
    from gpu_bench import DATA, learnable_rows

    from job.demo import start_local_s3

    results: dict = {"anchor": [], "matrix": [], "builds": {}}
    if not Path(ANCHOR_MODEL, "config.json").exists():
        code, _ = sh([sys.executable, str(HERE / "gpu_anchor.py"), "prepare", str(out)], out / "prepare.log")
        assert code == 0, (out / "prepare.log").read_text()[-3000:]
    cells = [c for c in os.environ.get("CELLS", "8b@24,4b@24,0.6b@24").split(",") if c]
    anchors = [a for a in os.environ.get("ANCHORS", "0.6b").split(",") if a]
    for shape in sorted({c.split("@")[0] for c in cells} | set(anchors)):
        if shape != "0.6b" and not Path(model_dir(shape), "config.json").exists():
            started = time.perf_counter()
            build_shape(shape)
            results["builds"][shape] = round(time.perf_counter() - started, 1)
    server, aws = start_local_s3()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    s3.put_object(Bucket="bench", Key="data/learnable.jsonl", Body=learnable_rows(Path(DATA)).encode())
    # gpu_anchor.py's steady figure skips its first 10 steps (warm-up): fewer than 12 leave none (run 38).
    assert int(os.environ.get("ANCHOR_STEPS", "15")) >= 12, "ANCHOR_STEPS below 12 gives the seed recipe no steady figure"
    for shape in anchors:
        if left() < 100:
            results["anchor"].append({"shape": shape, "skipped": "budget"})
            continue
        results["anchor"].append(anchor(out, shape, os.environ.get("ANCHOR_STEPS", "15")))
        print("anchor", json.dumps(results["anchor"][-1]), flush=True)
    for n, cell in enumerate(cells):
        cell, *extra = cell.split(";")  # shape@free[:length][;QLORA_X=value...]: a variant of the defaults
        where, _, length = cell.partition(":")
        shape, free = where.split("@")
        if left() < 70:
            results["matrix"].append({"model": shape, "free_gib": float(free), "length": length, "skipped": "budget"})
            continue
        settings = ({} if length == "full" else {"QLORA_TRAIN__EPOCHS": length[1:]} if length.startswith("e")
                    else {"QLORA_TRAIN__MAX_STEPS": os.environ.get("STEPS", "12")})
        settings.update(item.split("=", 1) for item in extra)
        name = f"m{n}-{shape}-{free}-{length or 'steps'}"
        results["matrix"].append(job_run(out, name, shape, float(free), settings, aws, to_the_end=length == "full"))
    server.stop()
    return results


if __name__ == "__main__":
    main()
