"""Answer metrics against hand-computed values that follow from the published definitions."""

import pytest

from tokensel.experiments.vqa_metrics import (CONTRACTIONS, anls, cider_d, exact_match, normalize_textvqa_answer,
                                              normalize_vqa_answer, pope_answer, pope_scores, relaxed_accuracy,
                                              textvqa_accuracy, vqav2_accuracy)


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
    ("an apple a day", "apple day"),
    ("eleven", "eleven"),         # number words only from zero to ten
    ("none", "0"),
    ("1,000", "1000"),            # a comma between digits: every mark is deleted ...
    ("1,000-2,000", "10002000"),  # ... the dash too
    ("red/white", "red white"),   # a mark touching no space becomes a space
    ("black - white", "black white"),  # a mark that touches a space anywhere is deleted
    ("it is (red)", "it is red"),  # "(" touches a space: deleted; ")" does not: a space
    ("yes!", "yes"),
    ("it's", "it's"),             # the apostrophe is not a punctuation mark here
    ("10:30", "10:30"),           # nor the colon
    # periods: deleted unless a digit follows
    ("3.5", "3.5"),
    (".5", ".5"),
    ("5.", "5"),
    ("a.m.", "am"),
    ("mr. smith", "mr smith"),
    ("1.5.2", "1.5.2"),
    # contractions written without their apostrophe, and only those
    ("dont know", "don't know"),
    ("wont", "won't"),
    ("hed", "he'd"),
    ("somebody'd", "somebodyd"),  # the official table's own mapping
    ("im", "im"),                 # the table's "Im" is capitalised: it never matches lower-cased text
    ("well", "well"),
    ("were", "were"),
    ("shed", "shed"),
    ("shell", "shell"),
    ("lets", "lets"),
    ("wed", "wed"),
    ("ill", "ill"),
    ("its", "its"),
    ("Well, we were there", "well we were there"),
])
def test_vqa_normalisation_follows_the_official_rules(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert (CONTRACTIONS["dont"], CONTRACTIONS["Im"], CONTRACTIONS["let's"], CONTRACTIONS["twas"]) == (
        "don't", "I'm", "let's", "'twas")
    for word in ("well", "were", "shed", "shell", "lets", "wed", "ill", "its", "id", "hell", "shes"):
        assert word not in CONTRACTIONS


@pytest.mark.parametrize("raw, normalised", [
    ("Dog's bed?", "dog 's bed"),   # "'s" split off, "?" deleted
    ("Hello, World", "hello world"),
    ("1,000", "1000"),
    ("COCA-COLA", "coca cola"),
    ("The Two Towers.", "2 towers"),
    ("well", "well"),
])
def test_textvqa_normalisation(raw, normalised):
    assert normalize_textvqa_answer(raw) == normalised


def test_vqav2_accuracy_averages_min_matches_over_3_over_the_ten_leave_one_out_subsets():
    # 3 of 10 humans: 3 subsets keep 2 matches (2/3), 7 keep 3 (1) -> (3 * 2/3 + 7) / 10
    assert vqav2_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 2 of 10: 2 subsets keep 1 (1/3), 8 keep 2 (2/3); 1 of 10: 9 subsets keep 1
    assert vqav2_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqav2_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3)
    assert vqav2_accuracy("2", ["2"] * 4 + ["x"] * 6) == 1.0
    assert vqav2_accuracy("", ["yes"] * 10) == 0.0
    # the prediction is normalised; humans who disagree are too
    assert vqav2_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("2", ["two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("AM", ["a.m."] * 2 + ["pm"] * 8) == pytest.approx(0.6)
    assert vqav2_accuracy("Yes", ["yes"] * 10) == 1.0


@pytest.mark.parametrize("word", ["well", "were", "shed", "shell", "lets"])
def test_ordinary_words_are_not_made_contractions(word):
    # ten humans who agree are compared as released: a prediction turned into "we'll" would score 0
    assert vqav2_accuracy(word, [word] * 10) == 1.0
    assert textvqa_accuracy(word.upper(), [word] * 10) == 1.0


def test_textvqa_accuracy_normalises_every_answer():
    assert textvqa_accuracy("Coca-Cola", ["coca cola"] * 4 + ["coke"] * 6) == 1.0
    assert textvqa_accuracy("dog's", ["dogs"] * 3 + ["Dog's"] * 3 + ["x"] * 4) == pytest.approx(0.9)
    assert textvqa_accuracy("1,000", ["1000"] * 2 + ["x"] * 8) == pytest.approx(0.6)
    assert textvqa_accuracy("two", ["Two"] * 10) == 1.0  # unlike VQAv2, humans who agree are normalised too
    assert textvqa_accuracy("stop", ["go"] * 10) == 0.0


@pytest.mark.parametrize("text, read", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"),
    ("Yes, there is a dog.", "yes"),
    ("There is no dog in the image.", "no"),
    ("It is not there", "no"),
    ("No, there isn't", "no"),      # the comma is deleted before the words are split
    ("Yes. No.", "yes"),            # only the first sentence counts
    ("NO", "yes"),                  # only No, no and not say no
    ("Nope", "yes"),
    ("", "yes"),
])
def test_pope_reads_answers_as_its_evaluation_does(text, read):
    assert pope_answer(text) == read


def test_pope_accuracy_and_f1():
    # TP at 0 and 4, FP at 1, FN at 2, TN at 3: precision = recall = 2/3, F1 = 2/3, accuracy = 3/5
    scores = pope_scores(["Yes", "yes", "No.", "no", "Yes, it is."], ["yes", "no", "yes", "no", "yes"])
    assert scores["accuracy"] == [1.0, 0.0, 0.0, 1.0, 1.0]
    # a = 2[TP] = (2, 0, 0, 0, 2), b = 2[TP] + [FP] + [FN] = (2, 1, 1, 0, 2), mean(b) = 1.2:
    # F1 + (a_i - F1 b_i) / 1.2
    f1 = 2 / 3
    tp, wrong = f1 + (2 - f1 * 2) / 1.2, f1 - f1 / 1.2
    assert scores["f1"] == pytest.approx([tp, wrong, wrong, f1, tp])
    assert sum(scores["f1"]) / 5 == pytest.approx(f1)  # the mean is F1 exactly
    assert sum(pope_scores(["no", "yes"], ["yes", "no"])["f1"]) == 0.0  # no true positive: F1 = 0
    assert all(v != v for v in pope_scores(["no", "no"], ["no", "no"])["f1"])  # no "yes" anywhere: undefined


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
