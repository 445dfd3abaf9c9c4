"""Diagnostics for slow steps, loaded as sitecustomize into the job's processes (gpu_bench.py DIAG=1).

Writes `DIAG <unix time> pid=<pid> <event>` lines to stderr:
- recompile: torch's recompile log stays on (Unsloth sets every torch log to CRITICAL at import);
- triton: each Triton JIT compile (Unsloth's and bitsandbytes' kernels) with its duration;
- batch: each batch the training data loader hands out, with its shape;
- step: each optimizer step's end, with dynamo's graph count and the CUDA allocator's counters.
With BENCH_DDP_BUCKET_VIEW=1 or BENCH_NO_OPTIMIZE_DDP=1 (without DIAG) it only runs that DDP
experiment (gpu_bench.py's job_ddp2_bucket_view, job_ddp2_no_optimize_ddp variants).
Not part of the job: it only explains the bench's step times."""

import importlib.abc
import importlib.util
import logging
import os
import sys
import time


def note(*parts) -> None:
    sys.stderr.write(f"DIAG {time.time():.3f} pid={os.getpid()} " + " ".join(str(p) for p in parts) + "\n")


def _torch_logging(module) -> None:
    original = module.set_logs

    def set_logs(*args, **kwargs):
        if kwargs.get("all") == logging.CRITICAL:
            note("kept torch recompile logs on (Unsloth asked to silence them)")
            return None
        return original(*args, **kwargs)

    module.set_logs = set_logs


def _triton_knobs(module) -> None:
    started: dict = {}

    def before(*args, **kwargs):
        started[str(kwargs.get("key"))] = time.perf_counter()
        return False  # False: go on and compile

    def after(*args, **kwargs):
        t = started.pop(str(kwargs.get("key")), None)
        seconds = f"{time.perf_counter() - t:.3f}s" if t else "?"
        note("triton", seconds, str(kwargs.get("repr", ""))[:300])

    module.runtime.jit_cache_hook = before
    module.runtime.jit_post_compile_hook = after


def _callbacks(module) -> None:
    original = module.CallbackHandler.on_step_end

    def on_step_end(self, args, state, control):
        import torch

        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        mem = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
        note("step", state.global_step, f"graphs={graphs}", f"device_allocs={mem.get('num_device_alloc')}",
             f"alloc_retries={mem.get('num_alloc_retries')}", f"reserved_gib={mem.get('reserved_bytes.all.current', 0) / 2**30:.2f}")
        return original(self, args, state, control)

    module.CallbackHandler.on_step_end = on_step_end


def _data_loader(module) -> None:
    original = module.DataLoaderShard.__iter__

    def __iter__(self):
        for i, batch in enumerate(original(self)):
            ids = batch.get("input_ids") if hasattr(batch, "get") else None
            note("batch", i, tuple(ids.shape) if ids is not None else "?")
            yield batch

    module.DataLoaderShard.__iter__ = __iter__


def _bucket_view(module) -> None:
    """DDP with gradient_as_bucket_view: gradients live in the all-reduce buckets, so the reducer skips
    a copy kernel per LoRA weight into its bucket and back (~800 launches a step, on a CPU-bound step)."""
    original = module.DistributedDataParallel.__init__

    def __init__(self, *args, **kwargs):
        kwargs["gradient_as_bucket_view"] = True
        note("ddp gradient_as_bucket_view=True")
        original(self, *args, **kwargs)

    module.DistributedDataParallel.__init__ = __init__


def _no_optimize_ddp(module) -> None:
    """Dynamo's DDPOptimizer splits graphs compiled inside DDP's forward at bucket boundaries; off."""
    module.optimize_ddp = False
    note("dynamo optimize_ddp=False")


class _After(importlib.abc.MetaPathFinder):
    """Runs a patch right after a module's own code, whoever imports it first."""

    patches: dict = {}

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        patch, load = self.patches.pop(name), spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                patch(module)
            except Exception as e:  # a diagnostic never breaks the run
                note("patch failed", name, repr(e))

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("DIAG"):
    os.environ.setdefault("TORCH_LOGS", "recompiles,graph_breaks")
    _After.patches.update({"torch._logging": _torch_logging, "triton.knobs": _triton_knobs,
                           "transformers.trainer_callback": _callbacks, "accelerate.data_loader": _data_loader})
if os.environ.get("BENCH_DDP_BUCKET_VIEW"):
    _After.patches["torch.nn.parallel.distributed"] = _bucket_view
if os.environ.get("BENCH_NO_OPTIMIZE_DDP"):
    _After.patches["torch._dynamo.config"] = _no_optimize_ddp
sys.meta_path.insert(0, _After())
