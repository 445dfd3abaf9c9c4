"""Engines (job/engine.py) on CPU with the tiny model: the dtype, load-failure mapping and the merge
that both engines share. The Unsloth branches are checked on a GPU in tests/test_gpu.py."""

import pytest

from job.errors import ConfigError, ExportError, ModelLoadError
from job.settings import Settings


@pytest.fixture
def settings(clean_env, tmp_path):
    return Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path / "out"), work_dir=tmp_path)


@pytest.fixture
def adapter(tiny_model, tiny_tokenizer, tmp_path):
    """An adapter whose B matrices are not zero, so merging changes every targeted weight; saved with
    its tokenizer, as the job saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_cpu_loads_and_computes_in_fp32():
    import torch

    from job.engine import model_dtype

    assert model_dtype() == torch.float32


@pytest.mark.parametrize("loader", ["training", "inference", "tokenizer"])
def test_a_missing_base_model_is_a_one_line_model_load_error_for_every_loader(loader, settings, adapter, tmp_path):
    from job import engine

    missing = str(tmp_path / "no-such-model")
    calls = {"training": lambda: engine.load_for_training(settings, "transformers", missing),
             "inference": lambda: engine.load_for_inference(settings, "transformers", missing, adapter),
             "tokenizer": lambda: engine.load_tokenizer(settings, missing)}
    with pytest.raises(ModelLoadError) as raised:
        calls[loader]()
    assert str(raised.value).startswith(f"cannot load base model {missing!r}: ") and "\n" not in str(raised.value)


def test_a_broken_adapter_at_reload_is_a_model_load_error(settings, tiny_model, tmp_path):
    from job import engine

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot reload the saved adapter"):
        engine.load_for_inference(settings, "transformers", str(tiny_model), tmp_path / "broken")


def test_the_merge_adds_the_adapter_in_the_training_dtype_and_rounds_once_to_16_bits(settings, tiny_model, adapter, tmp_path):
    """The merged weights are W + scale * B @ A computed as the adapter was trained and verified (fp32 on
    CPU), then stored in bf16: rounding the base to bf16 before adding would give other weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from job import engine

    engine.merge_adapter(settings, "transformers", str(tiny_model), adapter, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]
    expected = (base["model.layers.0.self_attn.q_proj.weight"] + (8 / 4) * b @ a).to(torch.bfloat16)
    got = merged["model.layers.0.self_attn.q_proj.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_a_merge_that_cannot_load_its_base_is_an_export_error(settings, adapter, tmp_path):
    from job import engine

    with pytest.raises(ExportError, match="cannot load base model"):
        engine.merge_adapter(settings, "transformers", str(tmp_path / "gone"), adapter, tmp_path / "merged")


def test_trainable_tokens_train_those_embedding_rows_and_name_an_unknown_token(clean_env, tmp_path, tiny_model, tiny_tokenizer):
    from job import engine

    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path), lora={"trainable_tokens": ["<|im_start|>", "<|im_end|>"]})
    model, _ = engine.load_for_training(settings, "transformers", str(tiny_model))
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert list(trainable.values()) == [(2, 64)], trainable  # the two rows (tied: the output rows with them)
    assert model.peft_config["default"].trainable_token_indices == tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    settings = Settings(dataset_uri="/x.jsonl", output_uri=str(tmp_path), lora={"trainable_tokens": ["<|no_such|>"]})
    with pytest.raises(ConfigError, match="'<|no_such|>' is not a token of the model's tokenizer"):
        engine.load_for_training(settings, "transformers", str(tiny_model))


def test_block_cuda_graphs_are_asked_of_unsloth_through_its_environment_and_a_set_variable_wins(monkeypatch):
    import os

    from job import engine

    monkeypatch.delenv("UNSLOTH_BLOCK_CUDAGRAPHS", raising=False)
    monkeypatch.setenv("UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES", "4")
    engine.enable_block_cuda_graphs(16)
    assert (os.environ["UNSLOTH_BLOCK_CUDAGRAPHS"], os.environ["UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES"]) == ("1", "4")
