"""Answer metrics against hand-computed values that follow from the published definitions."""

import pytest

from tokensel.experiments.vqa_metrics import (anls, cider_d, exact_match, normalize_vqa_answer, relaxed_accuracy,
                                              vqa_accuracy)


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Hello", ["hello"], 1.0),                     # case folded
    ("  hello   world ", ["hello world"], 1.0),    # whitespace folded
    ("helo", ["hello"], 1 - 1 / 5),                # one edit over five characters
    ("hxllx", ["hello"], 1 - 2 / 5),               # NL = 0.4 < 0.5: still scores
    ("hxxlx", ["hello"], 0.0),                     # NL = 0.6 >= 0.5: zero
    ("helo", ["goodbye", "hello"], 0.8),           # the best ground truth counts
    ("", ["hello"], 0.0),                          # empty prediction
    ("", [""], 1.0),                               # both empty: identical
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, target, expected", [
    ("10.4", "10", 1.0),     # 4 % off
    ("10.6", "10", 0.0),     # 6 % off
    ("-9.6", "-10", 1.0),    # relative to |target|
    ("12%", "0.12", 1.0),    # a percentage is divided by 100
    ("12%", "12", 0.0),
    ("12 kg", "12 kg", 1.0), # numbers with units are text: exact match
    ("12 kg", "12", 0.0),
    ("0", "0", 1.0),         # a zero target falls back to the exact match
    ("0.01", "0", 0.0),
    ("Yes", "yes", 1.0),     # case-insensitive text
    ("", "yes", 0.0),
])
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs.", "2 dogs"),
    ("the cat", "cat"),
    ("1,000", "1000"),          # a comma inside a number: punctuation dropped
    ("3.5", "3.5"),             # a period before a digit stays
    ("dont know", "don't know"),
    ("yes!", "yes"),
    ("red/white", "red white"), # punctuation touching no space becomes a space
    ("none", "0"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_averages_min_matches_over_3_over_leave_one_out_subsets():
    # 3 of 10 annotators: 3 subsets keep 2 matches (2/3), 7 keep 3 (1) -> (3 * 2/3 + 7) / 10
    assert vqa_accuracy("2", ["two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    assert vqa_accuracy("", ["yes"] * 10) == 0.0


def test_exact_match():
    assert exact_match(" Paris ", ["paris", "France"]) == 1.0
    assert exact_match("Pariss", ["paris"]) == 0.0


def test_cider_d_from_its_definition():
    # Two images with disjoint 4-word references: every n-gram has document frequency 1 of 2.
    # A candidate equal to its one reference has cosine 1 at n = 1..4 and no length penalty:
    # 10 * mean_n(1) = 10. A candidate sharing no word with its reference scores 0.
    refs = [["a b c d"], ["e f g h"]]
    assert cider_d(["a b c d", "e f g h"], refs) == pytest.approx([10.0, 10.0])
    assert cider_d(["a b c d", "x y z w"], refs) == pytest.approx([10.0, 0.0])
    # Only the 1- and 2-grams of a 2-word caption exist: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx([5.0, 5.0])
    # Case and punctuation are tokenized away; an empty caption scores 0.
    assert cider_d(["A B, C D.", ""], refs) == pytest.approx([10.0, 0.0])
