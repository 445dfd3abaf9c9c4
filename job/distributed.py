"""Multi-GPU training through PyTorch's own launcher (torch.distributed.run, DDP).

`python -m job` stays the pod's only process that fetches, validates, verifies and publishes.
With more than one training process it starts them through torchrun's launcher API
(`python -m job train-worker SPEC` per GPU); the Trainer sees torchrun's environment and trains
with DistributedDataParallel. A worker's exit code and one-line cause come back to this
process, so the exit-code table (and the chart's podFailurePolicy) holds for DDP runs too.

Multi-node (Kubeflow Trainer, or any launcher that sets PET_NNODES / PET_NODE_RANK /
PET_MASTER_ADDR / PET_MASTER_PORT): every node's job process starts its local workers into one
static rendezvous; global rank 0 saves the adapter on node 0, and only node 0 verifies and
publishes."""

import os
import signal
from pathlib import Path
from typing import NamedTuple

from job.errors import EXIT_CODES, ExitCode, JobError, Terminated, WorkerFailed
from job.logs import get_logger
from job.settings import Settings

log = get_logger(__name__)
SHUTDOWN_GRACE_S = 120  # workers get this long to checkpoint after SIGTERM before SIGKILL


def processes_per_node(settings: Settings) -> int:
    """Training processes on this node: auto = one per visible GPU (1 on CPU)."""
    if settings.nproc_per_node != "auto":
        return int(settings.nproc_per_node)
    if os.environ.get("PET_NPROC_PER_NODE", "auto").isdigit():  # Kubeflow Trainer's numProcPerNode
        return int(os.environ["PET_NPROC_PER_NODE"])
    import torch

    return max(1, torch.cuda.device_count())


def node_layout() -> tuple[int, int, str, int]:
    """(nodes, this node's rank, master address, master port) from Kubeflow Trainer's PET_* variables."""
    nodes = int(os.environ.get("PET_NNODES", "1"))
    rank = int(os.environ.get("PET_NODE_RANK", os.environ.get("JOB_COMPLETION_INDEX", "0")))
    return nodes, rank, os.environ.get("PET_MASTER_ADDR", "127.0.0.1"), int(os.environ.get("PET_MASTER_PORT", "29500"))


def threads_per_worker(nproc: int) -> int:
    """CPU threads each training process gets: the pod's CPUs (its cgroup v2 quota, else its CPU set)
    shared between the local processes. Each process's torch would otherwise start one thread a core
    of the host, however few the pod may use."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU limit visible
    return max(1, cpus // nproc)


class Ranks(NamedTuple):
    rank: int  # global
    local_rank: int  # the GPU this process trains on
    world_size: int


def ranks() -> Ranks:
    """This process's place in training, from torchrun's variables (one process: 0, 0, 1). The one place they are read."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def launch_workers(spec, nproc: int) -> None:
    """Run `python -m job train-worker SPEC` on nproc local processes (one rendezvous across nodes), each
    with the same TrainSpec; return when all succeeded, or raise the first failed worker's cause and code."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nodes, node_rank, master, port = node_layout()
    work, errors = spec.metrics_path.parent, spec.errors_dir
    errors.mkdir(parents=True, exist_ok=True)
    spec_path = work / "train-spec.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    options = {"shutdown_timeout": SHUTDOWN_GRACE_S} if "shutdown_timeout" in LaunchConfig.__dataclass_fields__ else {}  # torch >= 2.12
    config = LaunchConfig(
        min_nodes=nodes, max_nodes=nodes, nproc_per_node=nproc, run_id=spec.run_id,
        rdzv_backend="static", rdzv_endpoint=f"{master}:{port}", rdzv_configs={"rank": node_rank},
        max_restarts=0,  # a failed worker fails the pod; Kubernetes' backoffLimit owns retries
        monitor_interval=1, start_method="spawn", **options,
        logs_specs=DefaultLogsSpecs(log_dir=str(work / "worker-logs")),  # workers write straight to the pod's log
    )
    # torchrun's command line sets OMP_NUM_THREADS=1 for each worker unless it is set; its launcher API,
    # used here, does not, so each worker's torch would take every core for itself.
    threads = os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(nproc)))
    log.info("starting training workers", nproc_per_node=nproc, nodes=nodes, node_rank=node_rank, master=f"{master}:{port}",
             omp_num_threads=threads)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "job", "train-worker", str(spec_path))
    except ChildFailedError as failed:
        raise _worker_cause(failed, errors) from None
    except SignalException as stopped:
        raise Terminated(f"stopped by {signal.Signals(stopped.sigval).name}; workers saved a checkpoint, "
                         "a retry of this run resumes from it") from None


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _worker_cause(failed, errors: Path) -> JobError:
    """The most telling failure: a worker's own exit code from the table, with its one-line message.
    A worker writes its code beside its message: the launcher may see a signal instead (the agent
    stops the others once one fails)."""
    known = {int(c) for c in EXIT_CODES} - {int(ExitCode.OK), int(ExitCode.INTERNAL)}
    codes = {}
    for rank, failure in failed.failures.items():  # global rank -> ProcessFailure(exitcode, ...)
        written = errors / f"rank-{rank}.code"
        codes[rank] = int(written.read_text().strip()) if written.exists() else failure.exitcode
    rank = min(codes, key=lambda r: (codes[r] not in known, r))
    path = errors / f"rank-{rank}.txt"
    message = path.read_text(encoding="utf-8").strip() if path.exists() else f"exited {codes[rank]}"
    code = codes[rank] if codes[rank] in known else int(ExitCode.INTERNAL)
    return WorkerFailed(f"worker {rank}: {message}", ExitCode(code))
