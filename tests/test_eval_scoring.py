"""swaa.eval.scoring: each scorer, the judge hook, accuracy groups, length bins."""

from __future__ import annotations

import pytest

from swaa.eval.data import Example
from swaa.eval.scoring import (
    accuracy_by,
    choice_letter,
    choice_match,
    exact_match,
    get_scorer,
    judge_scorer,
    length_bin,
    normalize,
    substring_match,
)


def test_normalize_drops_case_punctuation_articles_spaces():
    assert normalize("  The Eiffel-Tower,  in PARIS! ") == "eiffeltower in paris"


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [("Paris.", ["paris"], 1.0), ("the Paris", ["Paris"], 1.0), ("Paris, France", ["Paris"], 0.0),
     ("Lyon", ["Paris", "Lyon"], 1.0)],
)
def test_exact_match_any_gold_item(prediction, gold, expected):
    assert exact_match(prediction, gold) == expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [("The number is 1234567.", ["1234567"], 1.0), ("12345678", ["1234567"], 0.0),
     ("ABCDE and FGHIJ", ["ABCDE", "FGHIJ"], 1.0), ("only ABCDE", ["ABCDE", "FGHIJ"], 0.0),
     ("New York City", ["new york"], 1.0)],
    ids=["present", "not_a_whole_word", "all_items", "one_item_missing", "multiword"],
)
def test_substring_match_needs_every_gold_item(prediction, gold, expected):
    assert substring_match(prediction, gold) == expected


@pytest.mark.parametrize(
    "text, letter",
    [("The answer is (C).", "C"), ("Answer: B", "B"), ("(D) because ...", "D"), ("A. Paris", "A"),
     ("I think it's E", "E"), ("no idea", None), ("**B**", "B")],
)
def test_choice_letter_extraction(text, letter):
    assert choice_letter(text) == letter


def test_choice_match_against_gold_forms():
    assert choice_match("The answer is (B)", ["B"]) == 1.0
    assert choice_match("B", ["(B) Berlin"]) == 1.0
    assert choice_match("The answer is (C)", ["B"]) == 0.0
    assert choice_match("no idea", ["B"]) == 0.0


def test_judge_hook_gets_question_gold_prediction():
    seen = []

    def judge(question, gold, prediction):
        seen.append((question, gold, prediction))
        return prediction == "yes"

    score = get_scorer("exact", judge=judge)  # a judge replaces the named scorer
    example = Example(prompt="long prompt", answer=["yes"], question="Is it?")
    assert score("yes", ["yes"], example) == 1.0 and score("no", ["yes"], example) == 0.0
    assert seen[0] == ("Is it?", "yes", "yes")
    without_question = Example(prompt="long prompt", answer=["a", "b"])
    judge_scorer(judge)("no", ["a", "b"], without_question)
    assert seen[-1] == ("long prompt", ["a", "b"], "no")  # prompt stands in; a list gold stays a list


def test_judge_may_return_a_fraction_but_not_nonsense():
    assert judge_scorer(lambda q, g, p: 0.5)("x", ["y"]) == 0.5
    with pytest.raises(ValueError, match=r"judge returned 'maybe': must be a bool or a number in \[0, 1\]"):
        judge_scorer(lambda q, g, p: "maybe")("x", ["y"])
    with pytest.raises(ValueError, match="judge=3: must be a callable"):
        judge_scorer(3)


def test_unknown_scorer_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"scorer='fuzzy': unknown; allowed: 'exact', 'substring', 'choice'"):
        get_scorer("fuzzy")
    with pytest.raises(ValueError, match="scorer='judge' needs a judge"):
        get_scorer("judge")
    custom = lambda prediction, gold, example: 1.0  # noqa: E731
    assert get_scorer(custom) is custom


def test_accuracy_by_group():
    records = [{"t": "a", "score": 1.0}, {"t": "a", "score": 0.0}, {"t": "b", "score": 1.0}]
    assert accuracy_by(records, "t") == {"a": {"accuracy": 0.5, "n": 2}, "b": {"accuracy": 1.0, "n": 1}}


@pytest.mark.parametrize("tokens, label", [(0, "0-1k"), (1023, "0-1k"), (1024, "1k-2k"), (20000, "16k-32k"),
                                           (300000, "256k+")])
def test_length_bins(tokens, label):
    assert length_bin(tokens) == label
    assert length_bin(150, edges=(100, 200)) == "100-200" and length_bin(50, edges=(100, 200)) == "<100"
