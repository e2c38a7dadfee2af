"""Answer metrics, as the benchmarks define them: per sample, one float in [0, 1] (CIDEr-D: >= 0).

================  ==========================================================================================
benchmark         metric
================  ==========================================================================================
DocVQA            :func:`anls`: Average Normalized Levenshtein Similarity (Biten et al., "Scene Text Visual
                  Question Answering", ICCV 2019, Sec. 4; DocVQA, Mathew et al., WACV 2021, Sec. 5):
                  ``max_gt (1 - NL(gt, pred))`` where the normalised distance ``NL < 0.5``, else 0.
ChartQA           :func:`relaxed_accuracy`: a number within 5 % of the target (a trailing ``%`` divides by
                  100), else an exact, case-insensitive match (Masry et al., "ChartQA", ACL Findings 2022,
                  Sec. 5, after Methani et al., "PlotQA", WACV 2020).
VQAv2             :func:`vqav2_accuracy`: ``min(#humans who gave the answer / 3, 1)``, averaged over the
                  ten leave-one-human-out subsets of the ten answers, with the official VQA evaluation's
                  answer processing (Antol et al., "VQA", ICCV 2015, Sec. 3; Goyal et al., "Making the V
                  in VQA Matter", CVPR 2017).
TextVQA           :func:`textvqa_accuracy`: the same accuracy with TextVQA's answer processing, applied to
                  the prediction and every human answer (Singh et al., "Towards VQA Models That Can
                  Read", CVPR 2019).
POPE              :func:`pope_scores`: accuracy and F1 of yes/no answers read as POPE's evaluation reads
                  them (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models",
                  EMNLP 2023).
exact match       :func:`exact_match`: 1 if the stripped, case-folded answer equals one of the targets.
COCO captions     :func:`cider_d`: CIDEr-D (Vedantam et al., "CIDEr", CVPR 2015, Sec. 4 and 8.1), by
                  ``pycocoevalcap``'s scorer, the implementation the COCO caption server runs.
================  ==========================================================================================

Edge cases, all tested: an empty prediction scores 0 against a non-empty target (and 1 against an
empty one for ANLS); numbers with units (``"12 kg"``) are not numbers for the relaxed match; a
target of 0 falls back to the exact match (a relative error to 0 is undefined).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from torchmetrics.functional.text import edit_distance

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


# ---- DocVQA -------------------------------------------------------------------------------------
def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    """Levenshtein distance over characters divided by the longer length (0 for two empty strings)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 0.0
    return float(edit_distance([a], [b], reduction="sum")) / longest


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against its ground-truth answers (case and whitespace folded)."""
    pred = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        nl = normalized_levenshtein(pred, _anls_text(answer))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ---- ChartQA ------------------------------------------------------------------------------------
def _to_number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    """1.0 if ``prediction`` is within ``tolerance`` relative error of a numeric ``target``, or equals
    a non-numeric (or zero) target case-insensitively; else 0.0."""
    pred, gold = _to_number(prediction), _to_number(target)
    if pred is not None and gold:
        return float(abs(pred - gold) / abs(gold) <= tolerance)
    return float(prediction.strip().lower() == target.strip().lower())


# ---- VQA accuracy ---------------------------------------------------------------------------------
# The answer processing of the official VQA evaluation, the code released with the VQA dataset (Antol
# et al., "VQA", ICCV 2015): its punctuation marks, period and comma patterns, number words, articles
# and contraction table, as they are there.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official pattern. Its first group is a lookahead that can never match before a period (it was
# meant as a lookbehind), so it drops every period not followed by a digit: "5." -> "5", "a.m." -> "am",
# while "2.5" and ".5" keep theirs.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
PERIOD_STRIP_COUNT = re.UNICODE  # the official script passes re.UNICODE (32) where sub() takes its count
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Contractions written without their apostrophes, and only those: ordinary words that an apostrophe
# would turn into a contraction ("well", "were", "shed", "shell", "lets", "wed", "ill", "its") are not
# keys. The table is the official one, quirks included: its capitalised keys ("Im", "Ive", "Id've") never
# match lower-cased text, and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Each mark of :data:`PUNCTUATION` is deleted where it touches a space somewhere in ``text`` (or
    ``text`` has a comma between two digits anywhere), else replaced by a space; then the periods
    that :data:`PERIOD_STRIP` finds are deleted."""
    out = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or COMMA_STRIP.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Lower case; number words zero to ten (and "none") to digits; articles dropped; contractions
    written without apostrophes given theirs (:data:`CONTRACTIONS`)."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA processing of a predicted answer: newlines and tabs to spaces, stripped,
    then :func:`process_punctuation` and :func:`process_digit_article`."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def normalize_textvqa_answer(answer: str) -> str:
    """TextVQA's processing of every answer, predicted and human (the EvalAI answer processor of
    the TextVQA evaluation, Singh et al., CVPR 2019): lower case, commas and question marks deleted,
    ``'s`` split off as a word, then :func:`normalize_vqa_answer`."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(answer)


def leave_one_out_accuracy(prediction: str, humans: Sequence[str]) -> float:
    """``min(#other humans who gave the prediction / 3, 1)``, averaged over the ways of leaving one
    of the humans out (the 10-choose-9 subsets of VQA's ten answers)."""
    if not humans:
        raise ValueError("VQA accuracy needs at least one human answer")
    scores = [min(1.0, sum(1 for j, human in enumerate(humans) if j != i and human == prediction) / 3.0)
              for i in range(len(humans))]
    return sum(scores) / len(scores)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as the official VQA evaluation computes it (Goyal et al., "Making the V in VQA
    Matter", CVPR 2017; Antol et al., ICCV 2015, Sec. 3): the human answers as released, stripped,
    and through :func:`process_punctuation` and :func:`process_digit_article` only when they are not
    all the same; then :func:`leave_one_out_accuracy`. The prediction is always normalised
    (:func:`normalize_vqa_answer`), as lmms-eval's VQAv2 task does: the official script leaves it
    raw when the humans agree, where a raw "Yes" would score 0 against ten "yes"."""
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(h)) for h in humans]
    return leave_one_out_accuracy(normalize_vqa_answer(prediction), humans)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as the TextVQA evaluation computes it: prediction and every human answer through
    :func:`normalize_textvqa_answer`, then :func:`leave_one_out_accuracy`."""
    return leave_one_out_accuracy(normalize_textvqa_answer(prediction), [normalize_textvqa_answer(a) for a in answers])


# ---- POPE ---------------------------------------------------------------------------------------
def pope_answer(text: str) -> str:
    """A free-form answer read as POPE's evaluation reads it (Li et al., "Evaluating Object
    Hallucination in Large Vision-Language Models", EMNLP 2023, arXiv:2305.10355): the first sentence
    only, commas deleted, split at spaces; ``no`` if a word is ``No``, ``no`` or ``not``, else ``yes``."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, list[float]]:
    """POPE's F1 and accuracy ("yes" is the positive class), per sample so that a mean and its CI
    come out as for any other metric.

    ``accuracy``: 1 where :func:`pope_answer` equals the label. ``f1``: F1 = 2TP / (2TP + FP + FN) is
    a ratio of means, a/b with a_i = 2 [TP_i] and b_i = 2 [TP_i] + [FP_i] + [FN_i], so it has no
    per-sample value; each sample gets its linearisation F1 + (a_i - F1 b_i) / mean(b) (the
    influence-function, or delta-method, linearisation of a ratio estimator). Their mean is F1
    exactly, their Student-t interval the delta-method interval, and a paired difference of two
    selectors' values the linearised difference of their F1s. With no "yes" among the labels or
    predictions F1 is undefined: NaN.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    said = [pope_answer(p) == "yes" for p in predictions]
    truth = [label.strip().lower() != "no" for label in labels]  # the official reading: anything but "no" is yes
    accuracy = [float(s == t) for s, t in zip(said, truth)]
    a = [2.0 * (s and t) for s, t in zip(said, truth)]
    b = [2.0 * (s and t) + (s and not t) + (t and not s) for s, t in zip(said, truth)]
    b_mean = sum(b) / len(b) if b else 0.0
    if b_mean == 0:
        return {"f1": [math.nan] * len(said), "accuracy": accuracy}
    f1 = sum(a) / sum(b)
    return {"f1": [f1 + (ai - f1 * bi) / b_mean for ai, bi in zip(a, b)], "accuracy": accuracy}


# ---- exact match --------------------------------------------------------------------------------
def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = prediction.strip().casefold()
    return float(any(pred == a.strip().casefold() for a in answers))


# ---- COCO captions ------------------------------------------------------------------------------
def caption_tokens(text: str) -> str:
    """Lower-cased words without punctuation: what the COCO server's PTB tokenizer leaves of a caption
    for CIDEr (its Java tokenizer is not run here; on plain captions the two agree)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """CIDEr-D of each prediction against its references, with document frequencies taken over this
    corpus of references (as the COCO evaluation does): n = 1..4, sigma = 6, clipped counts, x10."""
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        return []
    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    _, per_sample = Cider().compute_score(gts, res)
    return [float(s) for s in per_sample]
