"""Servability: would the published adapter load in the engines users serve with? PEFT accepts more than they do,
and a user would otherwise find out at deploy time, after the run was promoted.

Each rule is read from the engine's own loader, at the version named:
- vLLM (vllm/lora/peft_helper.py at e745baf, vllm/lora/utils.py parse_fine_tuned_lora_name at 0fd1570): no
  `modules_to_save`, no DoRA, no bias unless started with bias enabled, the rank at most --max-lora-rank (choices
  1, 8, 16, 32, 64, 128, 256, 320, 512; default 16), and every tensor a `lora_A`/`lora_B` weight or a
  `lora_embedding_A`/`_B`. LoRA on embed_tokens/lm_head loads only where the model class registers them: not
  Qwen2/Qwen3 (an open PR, vllm#33234).
- SGLang (python/sglang/srt/lora/utils.py at 8613c48): LoRA on q/k/v/o/gate/up/down of decoder layers only
  (stacked as qkv_proj and gate_up_proj; any other module has no hidden size there); --max-lora-rank and
  --lora-target-modules are inferred from the adapters it is started with.
- llama.cpp (convert_lora_to_gguf.py in llama-cpp-python 0.3.36's vendored llama.cpp): every tensor a `lora_A`/
  `lora_B` (or `lora_embedding_A`/`_B`, or a norm); embedding rows in the adapter end the conversion ("Embeddings is
  present in the adapter"), and LoRA on a tied lm_head is refused (llama.cpp#9065).
peft's trainable_token_indices (QLORA_LORA__TRAINABLE_TOKENS) writes `trainable_tokens_delta` tensors: no engine
above loads them."""

import json
from pathlib import Path

from job.errors import NotServable
from job.logs import get_logger

log = get_logger(__name__)
ENGINES = ("vllm", "sglang", "llama_cpp")
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def check_adapter(folder: Path, base_config: dict) -> dict:
    """{engine: {"servable": bool, "reason": str}} for vLLM, SGLang and llama.cpp, from the saved adapter's
    adapter_config.json and tensor names, and the base model's config (model_type, tied embeddings); vLLM's entry
    also holds the `flags` a rank over 16 needs."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as tensors:
        names = list(tensors.keys())
    report = {name: _verdict(problems) for name, problems in problems_by_engine(config, names, base_config).items()}
    if flags := vllm_flags(config):
        report["vllm"]["flags"] = flags
    return report


def problems_by_engine(config: dict, tensor_names: list[str], base_config: dict) -> dict[str, list[str]]:
    """Every rule each engine's loader would break on, empty where it loads (the pure part of check_adapter)."""
    targets = config.get("target_modules") or []
    targets = {targets} if isinstance(targets, str) else {t.split(".")[-1] for t in targets}
    other_tensors = sorted({n for n in tensor_names if not n.endswith(LORA_SUFFIXES)})
    embedding_targets = sorted(targets & {"embed_tokens", "lm_head"})
    rank = int(config.get("r") or 0)
    common = []
    if config.get("modules_to_save"):
        common.append(f"modules_to_save {sorted(config['modules_to_save'])} (whole modules in the adapter)")
    if config.get("use_dora"):
        common.append("DoRA (use_dora)")
    if any("trainable_tokens" in n for n in tensor_names) or config.get("trainable_token_indices"):
        common.append("trainable token rows (trainable_token_indices: trainable_tokens_delta tensors)")

    vllm = list(common)
    if other_tensors and not any("trainable_tokens" in n for n in other_tensors):
        vllm.append(f"tensor {other_tensors[0]!r} is not a LoRA weight")
    if rank > VLLM_RANKS[-1]:
        vllm.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    if config.get("bias", "none") != "none":
        vllm.append(f"bias {config['bias']!r} (needs vLLM started with LoRA bias enabled)")
    if embedding_targets and base_config.get("model_type") in ("qwen2", "qwen3"):
        vllm.append(f"LoRA on {', '.join(embedding_targets)}: vLLM's {base_config['model_type']} does not register them (vllm#33234)")

    sglang = list(common)
    if targets - PROJECTIONS:
        sglang.append(f"target modules {sorted(targets - PROJECTIONS)}: SGLang takes q/k/v/o/gate/up/down only")

    llama_cpp = list(common)
    if other_tensors and not any("trainable_tokens" in n for n in other_tensors):
        llama_cpp.append(f"tensor {other_tensors[0]!r} is not a LoRA weight")
    if "lm_head" in targets and base_config.get("tie_word_embeddings"):
        llama_cpp.append("LoRA on a tied lm_head (llama.cpp#9065: refused by its converter)")
    if config.get("use_dora"):
        llama_cpp.append("DoRA's magnitude vectors are not LoRA tensors")
    return {"vllm": vllm, "sglang": sglang, "llama_cpp": llama_cpp}


def _verdict(problems: list[str]) -> dict:
    return {"servable": not problems, "reason": "; ".join(dict.fromkeys(problems)) or "loads as published"}


def vllm_flags(config: dict) -> str:
    """The vLLM flags this adapter needs beyond --enable-lora: a rank above the default 16 needs --max-lora-rank."""
    rank = int(config.get("r") or 0)
    if rank <= VLLM_DEFAULT_RANK:
        return ""
    return f"--max-lora-rank {next(r for r in VLLM_RANKS if r >= rank)}"


def require(report: dict, engines: list[str]) -> None:
    """Raise NotServable (exit 8, before anything is published) when an engine the run must serve on cannot load it."""
    failing = [f"{engine}: {report[engine]['reason']}" for engine in engines if not report[engine]["servable"]]
    if failing:
        raise NotServable(f"the adapter would not load in {'; '.join(failing)} (QLORA_VERIFY__REQUIRE_SERVABLE)")


def check_run(adapter_dir: Path, base_config: dict, required: list[str]) -> dict:
    """The verify stage's servability check: the report (logged, kept for the manifest), then `require`."""
    report = check_adapter(adapter_dir, base_config)
    log.info("servability", **{engine: v["servable"] for engine, v in report.items()},
             reasons={engine: v["reason"] for engine, v in report.items() if not v["servable"]})
    require(report, required)
    return report
