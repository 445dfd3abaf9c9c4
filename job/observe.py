"""Observability beyond the logs: Prometheus Pushgateway pushes for short-lived Jobs (a
scrape would miss them), the Trainer's own integrations (tensorboard, mlflow, wandb), and a
loss-curve PNG that a person can open from the bucket."""

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import ConfigError, one_line
from job.logs import get_logger
from job.settings import MetricsSettings

log = get_logger(__name__)
JOB_LABEL = "qlora-job"
GAUGES = {
    "step": "Optimizer steps done", "max_steps": "Optimizer steps planned", "loss": "Training loss at the last logged step",
    "tokens_per_second": "Training tokens per second since the start", "eta_seconds": "Estimated seconds of training left",
    "eval_loss_before": "Held-out loss before training", "eval_loss_after": "Held-out loss after training (of the adapter kept)",
    "eval_loss": "Held-out loss at the last evaluation",
    **{f"{model}answer_{metric}": f"{what} answers to the held-out prompts: {name} (0-100)"
       for model, what in (("", "Tuned adapter's"), ("base_", "Base model's"), ("champion_", "Champion's"))
       for metric, name in (("exact_match", "exact match"), ("chrf", "chrF"))},
    "promoted": "1 when latest.json moved to this run, 0 when it stayed on the champion",
    "exit_code": "Exit code of the finished run (see `qlora-job exit-codes`)", "finished": "1 once the run has ended",
    "duration_seconds": "Wall time of the run",
}


class Pusher:
    """Pushes qlora_* gauges to a Pushgateway under job=qlora-job, run_id=<id>, at most every
    `every` seconds (final pushes always go). A failing push is a warning, never a failed run."""

    def __init__(self, url: str | None, run_id: str, every: float):
        from prometheus_client import CollectorRegistry

        self.url, self.run_id, self.every, self.last = url, run_id, every, 0.0
        self.registry = CollectorRegistry()
        self.gauges: dict = {}  # made on first set: a value never measured (no champion, no eval set) is not pushed as 0

    def update(self, force: bool = False, **values) -> None:
        from prometheus_client import Gauge

        for name, value in values.items():
            if value is not None and name in GAUGES:
                if name not in self.gauges:
                    self.gauges[name] = Gauge(f"qlora_{name}", GAUGES[name], registry=self.registry)
                self.gauges[name].set(float(value))
        if self.url and (force or time.monotonic() - self.last >= self.every):
            self.push()

    def push(self) -> None:
        from prometheus_client import push_to_gateway

        self.last = time.monotonic()
        try:
            push_to_gateway(self.url, job=JOB_LABEL, grouping_key={"run_id": self.run_id}, registry=self.registry, timeout=5)
        except OSError as error:
            log.warning("pushgateway push failed", url=self.url, error=one_line(error, 200))


def pusher(metrics: MetricsSettings, run_id: str) -> Pusher:
    return Pusher(metrics.pushgateway_url, run_id, metrics.push_every_seconds)


@dataclass
class RunMetrics:
    """One run's numbers: training's metrics, the stage timings, the data counts. metrics.json."""

    run_id: str
    timings: dict[str, float] = field(default_factory=dict)
    train: object | None = None  # job.train.TrainMetrics, once training has run
    data: object | None = None  # job.data.DataReport, once the data is validated
    parent: dict | None = None  # a warm start's parent adapter (warmstart.fetch_parent)
    evaluation: dict | None = None  # held-out answer metrics and the promotion decision (evaluate.evaluate_run)
    servable: dict | None = None  # {vllm, sglang, llama_cpp}: whether each loads the adapter, and why (servable.check_run)

    def as_json(self) -> dict:
        document = {**self.train.as_dict(), "run_id": self.run_id, "timings": self.timings, "parent": self.parent,
                    "evaluation": self.evaluation, "servable": self.servable}
        if self.data is not None:
            document.update(overlength_truncated=self.data.truncated, data=self.data.summary())
        return document


@contextlib.contextmanager
def metrics_file(path: Path, run_id: str):
    """Yield the run's RunMetrics and write them to path once, when the block ends (also when a later
    gate fails: the numbers stay in the work folder), if training ran."""
    metrics = RunMetrics(run_id)
    try:
        yield metrics
    finally:
        if metrics.train is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics.as_json(), ensure_ascii=False, indent=2), encoding="utf-8")


def check_report_to(names: list[str]) -> list[str] | str:
    """The Trainer's report_to value; each named integration must be installed (exit 2 otherwise)."""
    if not names:
        return "none"
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(f"QLORA_METRICS__REPORT_TO: {', '.join(missing)} is not installed in this image "
                          f"(installed: {', '.join(sorted(available)) or 'none'})")
    return names


def write_loss_curve(metrics: dict, path: Path) -> Path:
    """loss_curve.png: training loss against tokens seen, with eval loss before/after if measured."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    curve, evals = metrics.get("loss_curve") or [], metrics.get("eval_curve") or []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([p["tokens"] for p in curve], [p["loss"] for p in curve], label="training loss")
    end = curve[-1]["tokens"] if curve else 1
    if len(evals) > 2:  # evaluations during training, not only before and after
        ax.plot([p["tokens"] for p in evals], [p["eval_loss"] for p in evals], "o-", label="eval loss")
    for key, marker in (("eval_loss_before", "o"), ("eval_loss_after", "s")):
        if metrics.get(key) is not None:
            ax.plot([0 if key.endswith("before") else end], [metrics[key]], marker, label=key.replace("_", " "))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.set_title(f"{metrics.get('run_id', '')} ({metrics.get('steps', '?')} steps)")
    evaluation = metrics.get("evaluation") or {}
    if evaluation.get("prompts"):  # the held-out answer metrics and the promotion decision, as a caption
        rows = [f"{name}: chrF {evaluation[name]['chrf']:.1f}, exact {evaluation[name]['exact_match']:.1f}%"
                for name in ("tuned", "base", "champion") if evaluation.get(name)]
        promoted = "promoted" if evaluation["promotion"]["promoted"] else "NOT promoted"
        ax.text(0.98, 0.6, f"{evaluation['prompts']} held-out answers\n" + "\n".join(rows) + f"\n{promoted}",
                transform=ax.transAxes, ha="right", va="center", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8})
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
