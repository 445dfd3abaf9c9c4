"""Summaries of torch.profiler windows over training steps (bench/gpu_sweep.py, bench/profile_steps.py). Imports
nothing heavy at module level, so a script can profile a path that must import Unsloth itself (CUDA graphs are
read from the environment when Unsloth is imported)."""

from pathlib import Path

# Kernel name fragments -> what they do (Unsloth's kernels are Triton; bitsandbytes dequantises NF4).
CATEGORIES = [("dequant", ("dequant", "kdequant")), ("matmul", ("gemm", "cutlass", "sm90_", "nvjet", "cublas", "matmul")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")), ("triton (unsloth)", ("triton",)),
              ("optimizer", ("optimizer", "adam", "32bit", "8bit")), ("copy/fill", ("memcpy", "memset", "copy", "fill")),
              ("elementwise/reduce", ("elementwise", "reduce", "vectorized", "unrolled"))]


def summarise(prof, wall: float, steps: int, out: Path) -> dict:
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end, gaps = 0.0, spans[0][0] if spans else 0.0, []
    for lo, hi in spans:  # union of kernel intervals, in microseconds; the stretches between are the host's
        if lo > end:
            gaps.append(lo - end)
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    by_category: dict[str, float] = {}
    for e in kernels:
        name = e.name.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        by_category[category] = by_category.get(category, 0.0) + e.time_range.elapsed_us()
    total = sum(by_category.values()) or 1.0
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=35)
    except Exception:
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=35)
    cpu_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    (out / "profile.txt").write_text(f"{steps} steps, {wall:.3f} s wall\n\nBy GPU self time:\n{table}\n\nBy CPU total:\n{cpu_table}\n")
    return {
        "steps": steps, "wall_s_per_step": round(wall / steps, 4), "gpu_busy_s_per_step": round(busy / 1e6 / steps, 4),
        "gpu_idle_pct": round(100 * (1 - busy / 1e6 / wall), 1), "kernels_per_step": round(len(kernels) / steps),
        "kernel_time_share_pct": {k: round(100 * v / total, 1) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "host_gaps_ms": [round(g / 1000, 2) for g in sorted(gaps, reverse=True)[:8]],  # the longest: the GPU kept waiting
    }
