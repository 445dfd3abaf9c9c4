"""Engines: every difference between the two lives here: loading for training, loading for a fresh
reload, merging, the dtype, and how load failures become one-line errors.

- unsloth: FastLanguageModel, 4-bit NF4 QLoRA (the mission); CUDA only.
- transformers: transformers + peft (+ bitsandbytes 4-bit on CUDA); runs on CPU.
`import unsloth` happens only in this module, before trl/transformers/peft are
imported by anything else, so that Unsloth can patch them."""

import contextlib
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from job import chat, storage
from job.errors import ConfigError, ExportError, JobError, ModelLoadError, one_line
from job.logs import get_logger
from job.settings import Settings

log = get_logger(__name__)
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no phoning home from a cluster
# Unsloth's Triton fused cross-entropy recompiles mid-training whenever a batch's count of trained tokens
# falls in a new divisibility case, a stall every DDP rank waits on; its compiled chunked loss gives the
# same losses without them (bench/RESULTS.md). UNSLOTH_FUSED_LINEAR=1 in the environment brings it back.
os.environ.setdefault("UNSLOTH_FUSED_LINEAR", "0")


def enable_block_cuda_graphs(max_shapes: int) -> None:
    """Unsloth's per-block CUDA graphs (its _block_compile reads these when `import unsloth` runs, so this
    comes first); a variable already set in the environment wins."""
    import sys

    if "unsloth" in sys.modules:
        log.warning("unsloth already imported: CUDA graphs stay as its environment set them")
    os.environ.setdefault("UNSLOTH_BLOCK_CUDAGRAPHS", "1")
    os.environ.setdefault("UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES", str(max_shapes))


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_engine(requested: str, require_gpu: bool = False) -> str:
    """auto -> unsloth on a CUDA GPU with unsloth installed, else transformers. require_gpu: a pod that
    asked for GPUs and sees none (driver or container runtime misconfigured) stops here, not hours later."""
    if require_gpu and not has_cuda():
        raise ConfigError("GPUs were requested (QLORA_REQUIRE_GPU=true) but CUDA sees none: check the node's NVIDIA driver, "
                          "the container runtime (runtimeClassName) and NVIDIA_VISIBLE_DEVICES")
    unsloth_installed = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        # find_spec first: importing torch to ask about CUDA costs seconds we need not spend twice.
        return "unsloth" if unsloth_installed and has_cuda() else "transformers"
    if requested == "unsloth":
        if not unsloth_installed:
            raise ConfigError("QLORA_ENGINE=unsloth but unsloth is not installed (use the cuda image or the `gpu` extra)")
        if not has_cuda():
            raise ConfigError("QLORA_ENGINE=unsloth needs an NVIDIA GPU; none is visible (use QLORA_ENGINE=transformers on CPU)")
    return requested


def fetch_base_model(settings: Settings, fingerprint: str | None) -> str:
    """A local folder or hub id for the base model; s3:// prefixes are downloaded once into the cache,
    in a folder named by prefix and content fingerprint, so weights replaced in place are fetched anew."""
    name = settings.model.name
    if storage.is_s3(name):
        target = settings.model.cache_dir / hashlib.sha256(f"{name}\n{fingerprint}".encode()).hexdigest()[:16]
        done = target / ".complete"
        if not done.exists():
            log.info("downloading base model", source=name, cache=str(target))
            storage.fetch_prefix(name, target, ModelLoadError)
            done.touch()
        return str(target)
    if name.startswith("file://"):
        return storage.local_path(name).as_posix()
    return name


def base_model_fingerprint(settings: Settings) -> str | None:
    """What names the base model's content before it is fetched (periodic retraining compares it):
    an S3 prefix's keys, sizes and ETags, a local folder's file hashes. None for a hub id, whose
    QLORA_MODEL__REVISION stands for its content (pin a commit for an exact comparison)."""
    name = settings.model.name
    if storage.is_s3(name):
        return storage.content_fingerprint(name)
    if name.startswith("file://") or Path(name).is_dir():
        folder = storage.local_path(name).resolve()
        cache = settings.model.cache_dir / "fingerprints" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"
        return storage.content_fingerprint(str(folder), cache)
    return None


def hub_kwargs(settings: Settings) -> dict:
    """from_pretrained arguments for the base model: its revision, the token, never remote code."""
    kwargs = {"revision": settings.model.revision, "trust_remote_code": False}
    if settings.hf_token is not None:
        kwargs["token"] = settings.hf_token.get_secret_value()
    return kwargs


LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)  # what from_pretrained raises for missing or bad weights


@contextlib.contextmanager
def load_errors(what: str, error: type[JobError] = ModelLoadError):
    """Turn a library's load failure into a one-line JobError: `what: first line of the cause`. A config.json that
    its class refuses (huggingface_hub's strict dataclasses: 36 layers but 2 layer_types) is one too."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except (*LOAD_ERRORS, StrictDataclassError) as cause:
        text = one_line(cause)
        if isinstance(cause, StrictDataclassError) and cause.__cause__ is not None:
            text = f"{text} {one_line(cause.__cause__)}"
        raise error(f"{what}: {text}") from None


def model_dtype():
    """The dtype every engine loads and computes in: bf16 on a CUDA card that has it (fp16 otherwise),
    fp32 on CPU, where bf16 matmuls are slow and lose the small LoRA updates."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def gradient_checkpointing(settings: Settings, engine: str, config, planned: bool | None = None) -> str | bool:
    """What to pass as use_gradient_checkpointing. auto: the seed recipe's "unsloth"; for the fast recipe what
    plan.fit_to_card chose for this card (`planned`), or, where nothing was planned (several processes), only when
    one micro-batch would not fit in 80% of the free GPU memory without it."""
    choice = settings.lora.gradient_checkpointing
    if choice == "auto" and settings.train.recipe == "seed":
        choice = "unsloth"
    if choice == "auto" and planned is not None:
        choice = "unsloth" if planned else "false"
    if choice == "auto":
        import torch

        if not torch.cuda.is_available():
            return False
        # Peak memory without recomputation (fitted on an H200, bench/RESULTS.md): ~56 bytes per token per
        # hidden unit per layer plus the fp32 logits, and length-grouped batching starts with its longest
        # rows, ~1.5x the budget. Qwen3-0.6B at 16,384 tokens: 1.5 x 16,384 x (28 x 1,024 x 56 + 151,936 x 4) = 54 GB.
        per_token = config.num_hidden_layers * config.hidden_size * 56 + config.vocab_size * 4
        activations = 1.5 * settings.train.micro_batch_tokens * per_token
        free, _ = torch.cuda.mem_get_info()
        choice = "unsloth" if activations > 0.8 * free else "false"
    if choice == "unsloth":  # Unsloth's offloaded variant; plain recomputation on the transformers engine
        return "unsloth" if engine == "unsloth" else True
    return choice == "true"


def _load_base(settings: Settings, engine: str, source: str, *, quantized: bool = True, device: int = 0,
               error: type[JobError] = ModelLoadError):
    """The one place either engine's from_pretrained runs: (model, tokenizer or None), with the hub
    arguments, the dtype and the error mapping every load shares. `source` may be an adapter folder for
    Unsloth, which then loads its base model and the adapter (its merged save needs that)."""
    what = f"cannot load base model {source!r}"
    if engine == "unsloth":
        import unsloth  # noqa: F401  (must precede trl/transformers/peft)
        from unsloth import FastLanguageModel

        with load_errors(what, error):
            return FastLanguageModel.from_pretrained(
                model_name=source, max_seq_length=settings.model.max_seq_length, dtype=model_dtype(),
                load_in_4bit=settings.model.load_in_4bit and quantized, **hub_kwargs(settings),
            )
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = model_dtype()
    kwargs = {"dtype": dtype, "use_safetensors": True, **hub_kwargs(settings)}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": device}  # DDP: one GPU per worker
        if settings.model.load_in_4bit and quantized:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            )
    with load_errors(what, error):
        return AutoModelForCausalLM.from_pretrained(source, **kwargs), None


def load_tokenizer(settings: Settings, source: str):
    """The base model's tokenizer with the chosen chat template, without loading weights."""
    from transformers import AutoTokenizer

    with load_errors(f"cannot load base model {source!r}"):
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(settings))
    chat.set_chat_template(tokenizer, settings.model.chat_template)
    return tokenizer


def load_for_training(settings: Settings, engine: str, source: str, device: int = 0, checkpointing: bool | None = None):
    """Load the base model from source and attach fresh LoRA adapters; returns (model, tokenizer). `checkpointing`:
    the fitted plan's choice for auto (plan.fit_to_card), None where there is none."""
    lora = settings.lora
    model, tokenizer = _load_base(settings, engine, source, device=device)
    if tokenizer is None:
        tokenizer = load_tokenizer(settings, source)
    else:
        chat.set_chat_template(tokenizer, settings.model.chat_template)
    checkpointing = gradient_checkpointing(settings, engine, model.config, checkpointing)
    if engine == "unsloth":
        from unsloth import FastLanguageModel

        if lora.trainable_tokens:
            raise ConfigError("QLORA_LORA__TRAINABLE_TOKENS needs QLORA_ENGINE=transformers (Unsloth trains whole embeddings only)")
        return FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=lora.target_modules, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            bias="none", use_gradient_checkpointing=checkpointing, random_state=settings.train.seed,
            max_seq_length=settings.model.max_seq_length,
        ), tokenizer
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(settings.train.seed)
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        bias="none", task_type="CAUSAL_LM", trainable_token_indices=_token_ids(tokenizer, lora.trainable_tokens) or None,
    )), tokenizer


def load_adapter_weights(model, folder: Path) -> None:
    """Put a saved adapter's LoRA weights (adapter_model.safetensors in `folder`) into the model's attached
    adapter of the same shape (either engine's peft model). ValueError names what does not fit."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
    except RuntimeError as error:  # a size mismatch: trained on a base model of another shape
        raise ValueError(f"the adapter does not fit this base model: {str(error).splitlines()[-1].strip()}") from None
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    if unexpected:
        raise ValueError(f"the adapter has weights this model has no place for ({unexpected[0]})")


def _token_ids(tokenizer, tokens: list[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    unknown = [t for t in tokens if t not in vocab]
    if unknown:
        raise ConfigError(f"QLORA_LORA__TRAINABLE_TOKENS: {unknown[0]!r} is not a token of the model's tokenizer")
    return [vocab[t] for t in tokens]


def load_for_inference(settings: Settings, engine: str, source: str, adapter_dir: Path):
    """A fresh base model with the saved adapter loaded from disk, as a consumer would; returns (model, tokenizer)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, _ = _load_base(settings, engine, source)
    with load_errors(f"cannot reload the saved adapter from {adapter_dir}"):
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if engine == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def reloaded(settings: Settings, engine: str, source: str, adapter_dir: Path):
    """load_for_inference for the length of a block (the verify and evaluate stages): yields an object with
    .model and .tokenizer, emptied and the memory freed when the block ends (a name bound by `as (m, t)` would
    keep the model alive through the export's loads)."""
    import types

    loaded = types.SimpleNamespace(**dict(zip(("model", "tokenizer"), load_for_inference(settings, engine, source, adapter_dir), strict=True)))
    try:
        yield loaded
    finally:
        loaded.model = loaded.tokenizer = None
        free_memory()


def merge_adapter(settings: Settings, engine: str, source: str, adapter_dir: Path, merged_dir: Path) -> Path:
    """Write base + adapter as one 16-bit model to merged_dir (safetensors, with the tokenizer). Merged in
    model_dtype(), so the merged weights are the ones the adapter was verified with, rounded once to 16 bits."""
    import torch

    failed = "merging the adapter into the base model failed"
    merged_dir.mkdir(parents=True, exist_ok=True)
    if engine == "unsloth":
        # Unsloth loads base + adapter from the adapter folder and dequantises the 4-bit base as it merges.
        model, tokenizer = _load_base(settings, engine, str(adapter_dir), error=ExportError)
        with load_errors(failed, ExportError):
            model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
    else:
        from peft import PeftModel
        from transformers import AutoTokenizer

        base, _ = _load_base(settings, engine, source, quantized=False, error=ExportError)
        with load_errors(failed, ExportError):
            model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            if model.dtype == torch.float32:  # CPU: merged in fp32, published in 16 bits
                model = model.to(torch.bfloat16)
            model.save_pretrained(str(merged_dir), safe_serialization=True)
            AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(merged_dir))
    if (adapter_dir / "generation_config.json").exists():  # the job's adapters: stops on the end-of-turn token (job/chat.py)
        shutil.copyfile(adapter_dir / "generation_config.json", merged_dir / "generation_config.json")
    del model
    log.info("merged model written", folder=str(merged_dir), bytes=sum(p.stat().st_size for p in merged_dir.rglob("*") if p.is_file()))
    return merged_dir


def free_memory() -> None:
    """Collect dropped models and return cached GPU memory before the next model loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
