"""The verify gate's pure parts: what counts as the expected answer, and how long an answer may be."""

import unicodedata

from job.verify import same_text, token_budget


def test_an_expected_answer_matches_up_to_unicode_normalisation_and_whitespace():
    korean = "6G의 지연 목표는 0.1 ms입니다."
    nfd = unicodedata.normalize("NFD", korean)  # as a data file written on macOS often holds it
    assert nfd != korean and same_text(korean, nfd)
    assert same_text("About 0.1 ms.", "  About  0.1\nms. ")
    assert not same_text("About 0.1 ms.", "About 0.1 ms") and not same_text("Radio waves.", "radio waves.")


def test_a_long_training_answer_gets_room_to_end(tiny_tokenizer):
    short, long = "Radio waves.", " ".join(["The RIC runs xApps and rApps."] * 40)
    long_tokens = len(tiny_tokenizer(long, add_special_tokens=False)["input_ids"])
    assert long_tokens > 256
    assert token_budget(256, tiny_tokenizer, short) == 256 and token_budget(256, tiny_tokenizer, None) == 256
    assert token_budget(256, tiny_tokenizer, long) == -(-3 * long_tokens // 2) + 16
