"""bench/reward_brevity.py's three readings of one answer: what the probe compares must be what it says."""

from __future__ import annotations

from bench.reward_brevity import variants


def test_an_answer_splits_into_its_first_sentence_and_a_cut_one_of_about_that_length() -> None:
    text = "Paris is the capital. It has been the seat of the French state since the tenth century."
    assert variants(text) == ("Paris is the capital.", "Paris is the capital. It has been the")


def test_the_cut_reading_never_ends_a_sentence() -> None:
    text = "Paris is the capital. It is very big. It is also quite old, famous and much visited."
    first, cut = variants(text)  # type: ignore[misc]
    assert first == "Paris is the capital."
    assert cut == "Paris is the capital. It is very big"


def test_answers_without_a_short_first_sentence_are_not_probed() -> None:
    assert variants("One long sentence that never ends and keeps going on and on") is None
    long_first = "This first sentence is clearly the larger part of the whole answer. One two three four five."
    assert variants(long_first) is None
    assert variants("A first one. Then three words.") is None  # too little after it for a cut one
