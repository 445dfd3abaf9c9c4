"""A tiny Qwen3-architecture model (random, seeded) with a tokenizer trained on the
bundled sample data and Qwen3's real chat template. Tests, the demo and the kind
e2e use it: there is no model hub on CI machines or in air-gapped clusters."""

import json
from pathlib import Path

from job import chat

SAMPLE_DATA = Path(__file__).parent / "sample" / "6g_ai_qa.jsonl"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _sample_texts(path: Path) -> list[str]:
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.extend(str(v) for v in row.values() if isinstance(v, str))
    return texts


# Qwen3-0.6B's shape (config.json of the released model), for GPU benchmarks with random weights.
QWEN3_0_6B = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": None}


def make_tiny_model(out_dir: Path, *, shape: dict | None = None, tokenizer_vocab: int = 2048, seed: int = 0,
                    tokenizer=None, template: str = "qwen3", eos_token: str | None = None) -> Path:
    """Build and save (safetensors) a random Qwen3 model and a tokenizer trained on the sample data
    (or the tokenizer given, e.g. Qwen2's real vocabulary: tests/test_operations.py's GGUF test).
    shape: TINY (default) or QWEN3_0_6B; vocab_size None means the tokenizer's size. template and
    eos_token configure it like another release: ("qwen2_5", "<|endoftext|>") is a Qwen2.5 base model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(shape or TINY)
    fast = tokenizer if tokenizer is not None else _sample_tokenizer(tokenizer_vocab)
    fast.chat_template = chat.qwen_chat_template(template)
    if eos_token is not None:
        fast.eos_token = eos_token

    shape["vocab_size"] = shape["vocab_size"] or len(fast)
    config = Qwen3Config(
        **shape, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # LoRA leaves the (tied) embeddings frozen. At the default init (std 0.02) the logits stay
    # near-uniform whatever the adapters do; std 2/sqrt(hidden) gives logits of std ~2 to start
    # from (hidden 64: 0.25), so a random model can learn to answer and to stop.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=2 / config.hidden_size**0.5)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir


def _sample_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the sample data, with Qwen3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_sample_texts(SAMPLE_DATA), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"], model_max_length=40960,
    )
