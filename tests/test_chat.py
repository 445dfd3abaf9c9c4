"""The end-of-turn token comes from the chat template, whatever the tokenizer names as EOS."""

import copy

import pytest

from job.chat import end_of_turn_id, generation_config, qwen_chat_template, stop_token_ids
from job.errors import ConfigError


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)


def test_chatml_ends_turns_with_im_end_also_when_eos_is_endoftext(tokenizer):
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert end_of_turn_id(tokenizer) == im_end and stop_token_ids(tokenizer) == [im_end]
    # Qwen2.5 base models: EOS is <|endoftext|>, the ChatML template still closes turns with <|im_end|>.
    tokenizer.chat_template, tokenizer.eos_token = qwen_chat_template("qwen2_5"), "<|endoftext|>"
    assert end_of_turn_id(tokenizer) == im_end
    assert stop_token_ids(tokenizer) == [im_end, endoftext]


def test_a_template_with_its_own_end_of_turn_token(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_plain_text_turns_end_with_eos_and_a_template_without_content_is_refused(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="does not render an assistant message's content"):
        end_of_turn_id(tokenizer)


def test_the_published_generation_config_stops_on_both(tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer.chat_template, tokenizer.eos_token = qwen_chat_template("qwen2_5"), "<|endoftext|>"
    config = generation_config(model, tokenizer)
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>"), "the model's own is untouched"
