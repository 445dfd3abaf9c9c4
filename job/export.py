"""Exports beside the adapter: the base model with the adapter merged in (16-bit safetensors),
reloaded and gated like the adapter, and optionally a GGUF file made by llama.cpp's converter."""

import subprocess
import sys
from pathlib import Path

from job.engine import hub_kwargs
from job.errors import ConfigError, ExportError
from job.logs import get_logger
from job.settings import Settings

log = get_logger(__name__)
CONVERTER = "convert_hf_to_gguf.py"


def check_settings(settings: Settings) -> Path | None:
    """Fail fast, before training: GGUF needs the merged model, and `require` needs the converter.
    Returns the converter's path when GGUF will be made."""
    export = settings.export
    if export.gguf == "off":
        return None
    if not export.merged:
        raise ConfigError("QLORA_EXPORT__GGUF needs QLORA_EXPORT__MERGED=true (GGUF is converted from the merged model)")
    converter = export.llama_cpp_dir / CONVERTER
    if converter.is_file():
        return converter
    if export.gguf == "require":
        raise ConfigError(f"QLORA_EXPORT__GGUF=require but {converter} does not exist (set QLORA_EXPORT__LLAMA_CPP_DIR)")
    log.warning("GGUF export skipped: no llama.cpp converter in this image", looked_for=str(converter))
    return None


def merge_adapter(settings: Settings, engine: str, source: str, adapter_dir: Path, merged_dir: Path) -> Path:
    """Write base + adapter as one 16-bit model to merged_dir (safetensors, with the tokenizer)."""
    import torch

    merged_dir.mkdir(parents=True, exist_ok=True)
    try:
        if engine == "unsloth":
            from unsloth import FastLanguageModel

            # Unsloth loads base + adapter from the adapter folder and dequantises the 4-bit base as it merges.
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=str(adapter_dir), max_seq_length=settings.model.max_seq_length, dtype=None,
                load_in_4bit=settings.model.load_in_4bit,
            )
            model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
        else:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            dtype = torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float16
            base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **hub_kwargs(settings))
            model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            model.save_pretrained(str(merged_dir), safe_serialization=True)
            AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(merged_dir))
    except (OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"merging the adapter into the base model failed: {str(error).splitlines()[0][:300]}") from None
    del model
    log.info("merged model written", folder=str(merged_dir), bytes=sum(p.stat().st_size for p in merged_dir.rglob("*") if p.is_file()))
    return merged_dir


def load_merged(merged_dir: Path):
    """The merged model as any consumer loads it: plain transformers, no peft, no unsloth."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto", use_safetensors=True, trust_remote_code=False,
                                                 device_map={"": 0} if cuda else None)
    return model.eval(), AutoTokenizer.from_pretrained(str(merged_dir))


def convert_gguf(converter: Path, merged_dir: Path, out_dir: Path, out_type: str, required: bool) -> Path | None:
    """Run llama.cpp's converter on the merged model; a failure fails the run only when required."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"model-{out_type}.gguf"
    command = [sys.executable, str(converter), str(merged_dir), "--outfile", str(target), "--outtype", out_type]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and target.is_file():
        log.info("GGUF written", file=target.name, bytes=target.stat().st_size)
        return target
    cause = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1][:300]
    target.unlink(missing_ok=True)
    if required:
        raise ExportError(f"GGUF conversion failed: {cause}")
    log.warning("GGUF conversion failed; publishing without it", error=cause)
    return None
