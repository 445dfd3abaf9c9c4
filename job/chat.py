"""Chat templates: which one a tokenizer gets, and what it says about stopping (the token that ends an
assistant turn).

Training, the label check, verify's generation and the published generation config all use the
end-of-turn token. It is read from the template, not from `tokenizer.eos_token`: Qwen2.5 base models
name `<|endoftext|>` as EOS while their ChatML turns end with `<|im_end|>` (QwenLM/Qwen3#927)."""

from importlib import resources

from job.errors import ConfigError

_SENTINEL = "qlora-job-end-of-turn-probe"


def qwen_chat_template(name: str = "qwen3") -> str:
    """The original chat template of a Qwen family, as TRL ships it."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()


def set_chat_template(tokenizer, choice: str) -> None:
    """QLORA_MODEL__CHAT_TEMPLATE: qwen3 or qwen2_5 replace the tokenizer's template; auto keeps it, or gives
    a tokenizer without one Qwen3's."""
    if choice in ("qwen3", "qwen2_5"):
        tokenizer.chat_template = qwen_chat_template(choice)
    elif choice == "auto" and not tokenizer.chat_template:
        tokenizer.chat_template = qwen_chat_template("qwen3")
    elif not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template; set QLORA_MODEL__CHAT_TEMPLATE=qwen3 or qwen2_5")


def end_of_turn_id(tokenizer) -> int:
    """The first special token the chat template writes after an assistant message's content.
    A user turn follows the assistant's, since some templates only close a turn when another begins."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL},
                {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if _SENTINEL not in text:
        raise ConfigError("the chat template does not render an assistant message's content")
    special = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for token_id in tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    if tokenizer.eos_token_id is None:
        raise ConfigError("the chat template ends an assistant turn with no special token and the tokenizer has no EOS")
    return tokenizer.eos_token_id  # a template that ends turns with plain text: the answer ends with EOS


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops on the template's end-of-turn token and on EOS (end-of-turn first)."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_config(model, tokenizer):
    """The model's generation config, stopping on the end-of-turn token and EOS: published with the
    adapter (and the merged model) so that consumers stop where training taught the model to stop."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = stop_token_ids(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    return config
