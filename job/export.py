"""Exports beside the adapter: the base model with the adapter merged in (16-bit safetensors),
reloaded and gated like the adapter, and optionally GGUF files made by llama.cpp's converters: the merged
model, and the adapter itself (for `llama-server -m base.gguf --lora adapter.gguf`)."""

import subprocess
import sys
from pathlib import Path

from job import engine
from job.errors import ConfigError, ExportError
from job.logs import get_logger
from job.settings import ExportSettings, Settings

log = get_logger(__name__)
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"  # beside it in llama.cpp (and in the llama-cpp-python sdist)


def check_settings(export: ExportSettings) -> Path | None:
    """Fail fast, before training: GGUF needs the merged model, and `require` needs the converter.
    Returns the converter's path when GGUF will be made."""
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


def export_run(settings: Settings, engine_name: str, source: str, out: Path, probes: list[dict], adapter_report: dict,
               gguf_converter: Path | None) -> None:
    """The export stage: merge the adapter into the base model (out/merged), gate the merged model as the
    adapter was (out/verify-merged.json), and convert it to GGUF when asked."""
    from job import verify

    merged = engine.merge_adapter(settings, engine_name, source, out / "adapter", out / "merged")
    engine.free_memory()
    model, tokenizer = load_merged(merged)
    verify.verify_merged(model, tokenizer, probes, adapter_report, out.parent / "verify-merged.json", settings)
    (out.parent / "verify-merged.json").replace(out / "verify-merged.json")
    del model, tokenizer
    engine.free_memory()
    if gguf_converter is not None:
        required = settings.export.gguf == "require"
        # A base model llama.cpp cannot convert (an unknown pre-tokenizer) has no base GGUF for the LoRA to go on either.
        if convert_gguf(gguf_converter, merged, out / "gguf", settings.export.gguf_type, required) is None:
            return
        if Path(source).is_dir():  # the LoRA converter reads the base model's config.json from a folder
            convert_lora_gguf(gguf_converter.with_name(LORA_CONVERTER), out / "adapter", Path(source), out / "gguf", required)
        else:
            log.warning("LoRA GGUF skipped: the base model is not a local folder", source=source)


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
    target = out_dir / f"model-{out_type}.gguf"
    return _convert([str(converter), str(merged_dir), "--outfile", str(target), "--outtype", out_type], target, required, "GGUF")


def convert_lora_gguf(converter: Path, adapter_dir: Path, base_dir: Path, out_dir: Path, required: bool) -> Path | None:
    """Run llama.cpp's LoRA converter on the published adapter (16-bit: a few MB). It refuses what llama.cpp cannot
    load (embedding rows, a tied lm_head: job/servable.py); a failure fails the run only when required."""
    target = out_dir / "adapter-f16.gguf"
    command = [str(converter), str(adapter_dir), "--base", str(base_dir), "--outfile", str(target), "--outtype", "f16"]
    return _convert(command, target, required, "LoRA GGUF")


def _convert(arguments: list[str], target: Path, required: bool, what: str) -> Path | None:
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True)
    if result.returncode == 0 and target.is_file():
        log.info(f"{what} written", file=target.name, bytes=target.stat().st_size)
        return target
    cause = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1][:300]  # the converter's last line says why
    target.unlink(missing_ok=True)
    if required:
        raise ExportError(f"{what} conversion failed: {cause}")
    log.warning(f"{what} conversion failed; publishing without it", error=cause)
    return None
