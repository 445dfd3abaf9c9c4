"""Settings from QLORA_* environment variables (pydantic-settings).

S3 credentials, region and endpoint are deliberately absent: boto3 reads its own
standard variables (AWS_ACCESS_KEY_ID, AWS_REGION, AWS_ENDPOINT_URL_S3, IRSA's
AWS_WEB_IDENTITY_TOKEN_FILE, ...). Defaults are the seed tutorial's recipe."""

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from job.errors import ConfigError

ENV_PREFIX = "QLORA_"
DELIMITER = "__"
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dataset_sources(value: str) -> list[tuple[str, float]]:
    """A dataset URI setting as (uri, weight) pairs: one URI (an object, a file, or a prefix or folder of
    shards), or a JSON list of URIs and {"uri": ..., "weight": ...} objects. Raises ValueError."""
    from job.storage import check_uri

    if not value.lstrip().startswith("["):
        return [(check_uri(value), 1.0)]
    try:
        items = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"is not a valid JSON list: {error.msg} (column {error.colno})") from None
    if not items:
        raise ValueError("is an empty list")
    sources = []
    for item in items:
        entry = {"uri": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("uri"), str) or set(entry) - {"uri", "weight"}:
            raise ValueError(f'entry {json.dumps(item)} must be a URI or {{"uri": "...", "weight": N}}')
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of {entry['uri']} must be a number above 0, got {json.dumps(weight)}")
        sources.append((check_uri(entry["uri"]), float(weight)))
    return sources


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSettings(Section):
    name: str = Field("Qwen/Qwen3-0.6B", description="Base model: hub id, local folder, or s3:// prefix of a saved model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    load_in_4bit: bool = Field(True, description="Load the base weights in 4-bit NF4 (QLoRA). CUDA only; ignored on CPU.")
    max_seq_length: int = Field(2048, ge=16, description="Longest training sequence in tokens (prompt + answer).")
    chat_template: Literal["auto", "qwen3", "qwen2_5", "tokenizer"] = Field(
        "auto",
        description="Chat template: qwen3/qwen2_5 take TRL's copy of the original; tokenizer keeps the tokenizer's own; "
        "auto keeps the tokenizer's own and falls back to qwen3 when it has none.",
    )
    cache_dir: Path = Field(Path("/tmp/qlora-job/models"), description="Where s3:// models are downloaded to (once per content: a prefix whose objects change is fetched again).")


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0 lets Unsloth use its fast path).")
    target_modules: list[str] = Field(default_factory=lambda: list(SEVEN_PROJECTIONS), description="Modules that get adapters (JSON list).")
    trainable_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens whose embedding rows are trained too (peft trainable_token_indices; transformers engine): ChatML's "
        "start and end tokens for a base model whose chat-template tokens were never trained (docs/design.md, Stopping).",
    )
    init_from: str | None = Field(
        None, description="Warm start: continue from a published adapter instead of fresh LoRA weights: latest (the run "
        "latest.json points to; none yet: fresh weights) or an s3:// or local adapter folder. Same base model and LoRA shape, "
        "else exit 2; the manifest records the parent.",
    )
    gradient_checkpointing: Literal["auto", "unsloth", "true", "false"] = Field(
        "auto",
        description="Gradient checkpointing: auto (seed recipe: unsloth; fast recipe: job/plan.py's fastest choice that fits "
        "the card's free memory: on where the step is the host's, under CUDA graphs, or where the micro-batch needs it), "
        "unsloth (offloaded, unsloth engine), true, or false.",
    )


    @field_validator("init_from")
    @classmethod
    def _init_from(cls, value: str | None) -> str | None:
        from job.storage import check_uri

        return value if value in (None, "latest") else check_uri(value)


class TrainSettings(Section):
    recipe: Literal["fast", "seed"] = Field(
        "fast",
        description="fast: one micro-batch of ~micro_batch_tokens tokens a step, rows of similar length together, checkpointing only if needed; "
        "seed: the tutorial as written (2 rows x 4 accumulation, padding, Unsloth checkpointing).",
    )
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training rows (fractions allowed); sizes the run. Unset: fast 3, seed none "
        "(the tutorial's 60 steps). With max_steps also set, max_steps caps it.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps: alone, the run's length; with epochs, a cap. "
                                  "Unset: seed 60, fast sized by epochs.")
    per_device_batch_size: int | None = Field(None, ge=1, description="Rows per micro-batch; unset: seed 2, fast micro_batch_tokens / mean row tokens.")
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="Micro-batches per optimizer step; unset: seed 4 (2 x 4 = 8 rows a step), fast 1.")
    micro_batch_tokens: int = Field(16384, ge=64, description="Fast recipe: token budget of one micro-batch, at most 16 rows a step (job/plan.py).")
    pad_to_multiple_of: int | None = Field(
        None, ge=1,
        description="Pad each micro-batch's length to a multiple of this; unset: fast recipe on CUDA 128 with CUDA graphs, "
        "64 without (few distinct shapes, so few graphs and attention plans are built), otherwise no extra padding.",
    )
    cuda_graphs: bool | None = Field(
        None, description="Unsloth engine on CUDA: replay each decoder block's kernels as CUDA graphs (Unsloth's "
        "UNSLOTH_BLOCK_CUDAGRAPHS; the step is bound by launching kernels, not by the GPU), lengths padded to 128. "
        "Unset: the fast recipe on one process without packing turns them on where the blocks are checkpointed and the "
        "step is the host's (job/plan.py; without checkpointing they held 7.5x the memory and were slower).")
    compile_cache: bool = Field(
        True, description="On CUDA: load torch.compile's caches from <output_uri>/compile-cache/ before training and store "
        "them after, so the next run skips most of the first step's compile (job/compile_cache.py; the cache is code the "
        "next run executes: turn it off if others can write the output prefix).")
    learning_rate: float | None = Field(
        None, gt=0,
        description="Peak learning rate; unset: seed 2e-4, fast scaled up with the rows a step (docs/design.md).",
    )
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; unset: seed 5, fast the steps that cover the seed's first 5 steps' rows.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name.")
    optim: str | None = Field(
        None, description="transformers optimizer name; unset: seed adamw_8bit (needs bitsandbytes on CUDA, else adamw_torch), "
        "fast adamw_torch_fused on CUDA.",
    )
    weight_decay: float = Field(0.01, ge=0, description="Weight decay.")
    seed: int = Field(3407, description="Seed for LoRA init, shuffling and dropout.")
    packing: bool = Field(False, description="Pack rows into full max_seq_length sequences (padding-free); worth it only with FlashAttention-2 or xformers installed.")
    logging_steps: int = Field(1, ge=1, description="Log progress every N steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class DataSettings(Section):
    max_reject_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Largest share of rejected rows before the run fails (0 = none allowed).")
    max_line_bytes: int = Field(1 << 20, ge=1024, description="Longest accepted JSONL line in bytes; longer lines are rejected unread.")
    max_compression_ratio: float = Field(
        100.0, ge=0.0, description="A .gz or .zst shard that decompresses to more than this many times the compressed bytes "
        "read so far (plus 4 MiB) is refused as a decompression bomb (exit 3); JSONL compresses 3-20x. 0: no limit.")
    overlength: Literal["reject", "truncate"] = Field("reject", description="Rows longer than model.max_seq_length: reject (counted as bad rows) or truncate.")
    system_prompt: str | None = Field(None, description="System prompt added to rows that have none.")

    @field_validator("system_prompt")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        # An environment variable holding bytes that are not UTF-8 reaches Python as lone surrogates.
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid UTF-8 text") from None
        return value
    train_turns: Literal["all", "last"] = Field(
        "all", description="Which assistant turns of a multi-turn messages row carry the loss: all of them (system and user "
        "turns masked), or only the last (the earlier ones are context, as in the prompt/completion format).",
    )


class CheckpointSettings(Section):
    every_steps: int = Field(0, ge=0, description="Save and upload a checkpoint every N optimizer steps (0: only by time and on SIGTERM).")
    every_minutes: float = Field(30.0, ge=0, description="Save and upload a checkpoint when this many minutes passed since the last (0: off).")
    keep: int = Field(2, ge=1, description="Uploaded checkpoints kept per run (older ones are deleted).")


class RetrainSettings(Section):
    skip_unchanged: bool = Field(
        True, description="Exit 0 without training when the dataset's sha256, the training settings and the base model "
        "(name, revision, and content: S3 ETags or local file hashes) equal those of the run latest.json points to "
        "(periodic retraining).",
    )
    keep_runs: int = Field(0, ge=0, description="Published runs kept under the output prefix, newest first (0: keep all). "
                           "Runs without a manifest are never deleted.")


class EvalSettings(Section):
    fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the validated rows held out for evaluation (0: none).")
    dataset_uri: str | None = Field(None, description="A separate JSONL evaluation set (instead of a held-out fraction); "
                                    "the same forms as QLORA_DATASET_URI, weights ignored.")
    require_improvement: bool = Field(False, description="Fail (exit 4, nothing published) unless eval loss after training is "
                                      "below eval loss before it.")
    strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="Eval loss during training as well: every QLORA_EVAL__STEPS optimizer steps, or at each epoch's end. "
        "The adapter with the lowest eval loss is the one saved, verified and published (it survives a resume).")
    steps: int = Field(50, ge=1, description="With strategy steps: evaluate every N optimizer steps.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop training after this many evaluations in a row without a "
                                         "new lowest eval loss (0: never; needs a strategy).")
    early_stopping_threshold: float = Field(0.0, ge=0.0, description="How much lower than the best an eval loss must be to "
                                            "count as better, for early stopping.")
    answer_prompts: int = Field(64, ge=0, description="Held-out prompts answered (greedy) by the tuned adapter, the base model "
                                "and the champion, and scored against their references: exact match and chrF (0: none).")
    answer_max_new_tokens: int = Field(128, ge=1, description="Generation budget of each held-out answer.")
    answer_batch_size: int = Field(8, ge=1, description="Held-out prompts generated together.")

    @field_validator("dataset_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None:
            dataset_sources(value)
        return value

    @model_validator(mode="after")
    def _gate_needs_data(self):
        wanted = [name for name, on in (("require_improvement", self.require_improvement), ("strategy", self.strategy != "no"),
                                        ("early_stopping_patience", self.early_stopping_patience)) if on]
        if wanted and not (self.fraction or self.dataset_uri):
            raise ValueError(f"{wanted[0]} needs an evaluation set: set QLORA_EVAL__FRACTION or QLORA_EVAL__DATASET_URI")
        if self.early_stopping_patience and self.strategy == "no":
            raise ValueError("early_stopping_patience needs evaluations during training: set QLORA_EVAL__STRATEGY to steps or epoch")
        return self


class PromotionSettings(Section):
    metric: Literal["chrf", "exact_match"] = Field(
        "chrf", description="Held-out answer metric (0-100) that decides whether latest.json moves to this run: chrF "
        "(sacrebleu, character n-grams; any language) or exact match.")
    tolerance: float = Field(1.0, ge=0.0, description="latest.json moves unless this run scores more than this many points "
                             "below the champion (the run latest.json points to, same base model) on the same prompts.")
    compare: bool = Field(True, description="Score the champion's adapter and compare (off: every verified run is promoted).")
    fail_when_not_promoted: bool = Field(False, description="Exit 7 instead of 0 when the run is published but not promoted.")


class MetricsSettings(Section):
    pushgateway_url: str | None = Field(None, description="Prometheus Pushgateway (http://host:9091) that receives progress "
                                        "every push_every_seconds and final metrics, grouped by job and run_id.")
    push_every_seconds: float = Field(30.0, gt=0, description="How often progress is pushed to the Pushgateway.")
    report_to: list[str] = Field(default_factory=list, description='Trainer integrations, JSON list, e.g. ["tensorboard"] or '
                                 '["mlflow"]; each must be installed (their own variables configure them).')
    loss_curve_png: bool = Field(True, description="Publish loss_curve.png beside metrics.json.")


class ExportSettings(Section):
    merged: bool = Field(False, description="Also publish the base model with the adapter merged in, 16-bit safetensors "
                         "(Unsloth's merged save on the unsloth engine), after it passes the same reload gate.")
    gguf: Literal["off", "try", "require"] = Field(
        "off", description="GGUF export of the merged model with llama.cpp's convert_hf_to_gguf.py: try (skipped with a "
        "warning when no converter is found) or require (exit 2 without one). Needs export.merged.",
    )
    gguf_type: Literal["f16", "bf16", "q8_0"] = Field("q8_0", description="GGUF output type.")
    llama_cpp_dir: Path = Field(Path("/opt/llama.cpp"), description="Folder holding llama.cpp's convert_hf_to_gguf.py.")


class Probe(Section):
    prompt: str
    expected: str | None = None


class VerifySettings(Section):
    prompts: list[Probe] = Field(
        default_factory=list,
        description='Extra probes, JSON list of {"prompt": ..., "expected": ...}; expected answers must match exactly.',
    )
    train_probes: int = Field(3, ge=0, description="How many training prompts to probe as well.")
    expect_memorised: bool = Field(False, description="Require the training probes to reproduce their training answers exactly.")
    max_new_tokens: int = Field(
        256, ge=1, description="Generation budget per probe, raised to 1.5x its training (or expected) answer + 16 tokens "
        "where that is longer; an answer must end before it.",
    )
    require_change: bool = Field(True, description="Require at least one answer to differ from the base model's.")
    require_servable: list[Literal["vllm", "sglang", "llama_cpp"]] = Field(
        default_factory=list, description="Engines the adapter must load in as published (JSON list of vllm, sglang, "
        "llama_cpp): one whose loader would refuse it (job/servable.py) fails the run with exit 8 before publishing. The "
        "manifest's `servable` says it for every engine either way.")

    @model_validator(mode="after")
    def _something_to_verify(self):
        # Found at start-up (and by `plan`), not after training: the gate needs at least one probe.
        if not self.prompts and not self.train_probes:
            raise ValueError("nothing to verify: set QLORA_VERIFY__PROMPTS or QLORA_VERIFY__TRAIN_PROBES above 0")
        return self


class PlanSettings(Section):
    gpu: Literal["H100", "H200", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G"] = Field(
        "H100", description="`qlora-job plan`: the card to plan for on a CPU (its memory and bf16 throughput from NVIDIA's "
        "datasheets; `plan --gpu NAME` sets it too). A run plans for the card it runs on.")


class Settings(BaseSettings):
    """Everything one run needs; built once in main() and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=DELIMITER, case_sensitive=False, extra="forbid", validate_default=True
    )

    dataset_uri: str = Field(description="JSONL dataset: an s3:// object, file:// or local file (.gz/.zst decompressed); "
                             "an s3:// prefix or local folder of *.jsonl[.gz|.zst] shards; or a JSON list of those, "
                             'each optionally {"uri": ..., "weight": N} (docs/design.md, "Datasets").')
    output_uri: str = Field(description="Prefix that receives <run_id>/adapter, metrics, manifest: s3://bucket/prefix or a local folder.")
    run_id: str | None = Field(None, description="Run identity; defaults to a timestamp and random suffix. Set it to the Job name so retries share it.")
    engine: Literal["auto", "unsloth", "transformers"] = Field("auto", description="auto: unsloth on a CUDA GPU, else transformers.")
    work_dir: Path = Field(Path("/tmp/qlora-job"), description="Scratch folder for data, checkpoints and the adapter.")
    termination_log: Path = Field(Path("/dev/termination-log"), description="Where the one-line failure cause is written.")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a TTY, JSON lines otherwise.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    hf_token: SecretStr | None = Field(None, description="Hub token for gated base models (secret; never logged).")
    require_gpu: bool = Field(
        False, description="Exit 2 when no CUDA GPU is visible instead of training on CPU (the chart sets it when the pod requests GPUs).",
    )
    nproc_per_node: str = Field(
        "auto", description="Training processes on this node, one per GPU: auto (every visible GPU, 1 on CPU) or a number; "
        "above 1 the job trains with DDP through torchrun's launcher.",
    )

    model: ModelSettings = ModelSettings()
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    data: DataSettings = DataSettings()
    plan: PlanSettings = PlanSettings()
    verify: VerifySettings = VerifySettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    retrain: RetrainSettings = RetrainSettings()
    eval: EvalSettings = EvalSettings()
    promotion: PromotionSettings = PromotionSettings()
    metrics: MetricsSettings = MetricsSettings()
    export: ExportSettings = ExportSettings()

    @field_validator("dataset_uri")
    @classmethod
    def _dataset_uri(cls, value: str) -> str:
        dataset_sources(value)
        return value

    @field_validator("output_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        from job.storage import check_uri

        return check_uri(value)

    @field_validator("nproc_per_node")
    @classmethod
    def _nproc(cls, value: str) -> str:
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise ValueError("must be auto or a whole number of at least 1")
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not valid_run_id(value):
            raise ValueError("must be 1-63 characters of letters, digits, '-', '_' or '.', starting with a letter or digit")
        return value


def valid_run_id(value: object) -> bool:
    """A run id becomes an S3 key segment, a local folder name and a label value: 1-63 of the characters all three
    allow, starting with a letter or digit (so never '.' or '..', which would climb out of the output prefix)."""
    return (isinstance(value, str) and 0 < len(value) <= 63 and value[0].isascii() and value[0].isalnum()
            and all(c.isascii() and (c.isalnum() or c in "-_.") for c in value))


def env_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """Every accepted variable name mapped to its field (nested sections flattened with __)."""
    names = {}
    for field_name, field in model.model_fields.items():
        name = prefix + field_name.upper()
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            names.update(env_names(field.annotation, name + DELIMITER))
        else:
            names[name] = field
    return names


def _reject_unknown(environ: dict[str, str]) -> None:
    known = env_names()
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        # A JSON value for a whole section (QLORA_LORA='{"r": 8}') is also valid.
        if upper[len(ENV_PREFIX):].lower() in Settings.model_fields:
            continue
        nearest = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else "; run `qlora-job config --env-docs` for the list"
        raise ConfigError(f"unknown setting {key}{hint}")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    name = ENV_PREFIX + DELIMITER.join(loc).upper() if loc else ENV_PREFIX + "*"
    if first["type"] == "missing":
        return f"{name} is required: {env_names().get(name).description if name in env_names() else ''}".rstrip(": ")
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {str(value)[:80]!r})"
    return f"{name}: {message}{shown}"


def load_settings() -> Settings:
    """Build Settings from the environment; every problem becomes a one-line ConfigError."""
    _reject_unknown(dict(os.environ))
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    except SettingsError:
        # pydantic-settings could not JSON-decode a list/object value; find which one.
        raise ConfigError(_bad_json(dict(os.environ))) from None


def _bad_json(environ: dict[str, str]) -> str:
    known = env_names()
    for key, value in sorted(environ.items()):
        field = known.get(key.upper())
        if field is not None and str(field.annotation).startswith(("list", "dict", "typing.List")):
            try:
                json.loads(value)
            except ValueError:
                return f"{key.upper()}: must be JSON, e.g. [\"q_proj\", \"v_proj\"] (got {value[:80]!r})"
    return "a QLORA_* variable holds invalid JSON"


def redacted(settings: Settings) -> dict[str, Any]:
    """Settings as JSON-ready data; SecretStr values are shown as '**********' (set) or null."""
    return json.loads(settings.model_dump_json())


def _type_name(annotation: Any) -> str:
    """A short, table-safe name: 'str', 'int, optional', 'auto/json/console', 'JSON list'."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return "/".join(str(a) for a in get_args(annotation))
    if type(None) in get_args(annotation):
        return _type_name(args[0]) + ", optional"
    if get_origin(annotation) is list:
        return "JSON list"
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def env_docs() -> list[dict[str, str]]:
    """One entry per variable: name, type, default, description. The docs and the chart read this."""
    rows = []
    for name, field in env_names().items():
        default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = json.dumps([d.model_dump() if isinstance(d, BaseModel) else d for d in default])
        rows.append({"name": name, "type": _type_name(field.annotation), "default": "" if default is None else str(default),
                     "description": field.description or ""})
    return rows
