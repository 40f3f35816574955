"""Streaming text: whole characters only, and nothing that might be the start of a stop string."""

from __future__ import annotations

import pytest

from mmdisagg.language.detokenizer import Detokenizer
from mmdisagg.models.tiny import build_tokenizer

TOKENIZER = build_tokenizer()


def stream(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    detokenizer = Detokenizer(TOKENIZER, stop)
    deltas = []
    for token_id in TOKENIZER.encode(text, add_special_tokens=False):
        deltas.append(detokenizer.push(token_id))
        if detokenizer.stopped:
            break
    return deltas, detokenizer


def test_multibyte_characters_are_never_split() -> None:
    text = "猫がいます。 Café 🦓 naïve"
    deltas, detokenizer = stream(text)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) + detokenizer.flush() == text
    assert "" in deltas  # some token ended inside a character and had to wait


def test_special_tokens_are_not_text() -> None:
    deltas, detokenizer = stream("Hi<|im_end|> there")
    assert "".join(deltas) + detokenizer.flush() == "Hi there"


def test_stop_string_is_cut_with_everything_after() -> None:
    deltas, detokenizer = stream("The boat is red. STOP here and more", stop=("STOP",))
    assert detokenizer.stopped
    assert "".join(deltas) == "The boat is red. "
    assert detokenizer.flush() == ""


def test_possible_stop_start_is_held_back_then_released() -> None:
    detokenizer = Detokenizer(TOKENIZER, stop=("red dog",))
    shown = ""
    for token_id in TOKENIZER.encode("a red door", add_special_tokens=False):
        shown += detokenizer.push(token_id)
        assert not shown.endswith(("r", "re", "red", "red ", "red d", "red do"))
    assert not detokenizer.stopped
    assert shown + detokenizer.flush() == "a red door"


@pytest.mark.parametrize("stop", [("o",), ("r", "a re"), ("door", "red")])
def test_earliest_stop_wins(stop: tuple[str, ...]) -> None:
    text = "a red door"
    deltas, _ = stream(text, stop)
    assert "".join(deltas) == text[:min(text.index(s) for s in stop)]


def test_unfinished_character_is_flushed_at_the_end() -> None:
    detokenizer = Detokenizer(TOKENIZER)
    ids = TOKENIZER.encode("ok 🦓", add_special_tokens=False)
    shown = "".join(detokenizer.push(token_id) for token_id in ids[:-1])
    assert shown + detokenizer.flush() == TOKENIZER.decode(ids[:-1])
