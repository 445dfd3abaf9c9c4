"""A tiny Qwen3-architecture model (random, seeded) with a tokenizer trained on the
bundled sample data and Qwen3's real chat template. Tests, the demo and the kind
e2e use it: there is no model hub on CI machines or in air-gapped clusters."""

import json
from importlib import resources
from pathlib import Path

SAMPLE_DATA = Path(__file__).parent / "sample" / "6g_ai_qa.jsonl"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def qwen_chat_template(name: str = "qwen3") -> str:
    """The original chat template of a Qwen family, as TRL ships it."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()


def _sample_texts(path: Path) -> list[str]:
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.extend(str(v) for v in row.values() if isinstance(v, str))
    return texts


def make_tiny_model(out_dir: Path, *, hidden_size: int = 64, layers: int = 2, vocab_size: int = 2048, seed: int = 0) -> Path:
    """Build and save (safetensors) a tiny random Qwen3 model and its tokenizer into out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_sample_texts(SAMPLE_DATA), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"], model_max_length=2048,
    )
    fast.chat_template = qwen_chat_template("qwen3")

    heads = max(2, hidden_size // 16)
    config = Qwen3Config(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=16, max_position_embeddings=2048,
        rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # LoRA leaves the (tied) embeddings frozen. At the default init (std 0.02) the logits
    # stay near-uniform whatever the adapters do; std 0.25 lets a tiny model become confident.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=0.25)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir
