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
VQA v2, TextVQA   :func:`vqa_accuracy`: ``min(#annotators who gave the answer / 3, 1)``, averaged over the
                  ten leave-one-annotator-out subsets of the ten answers, after the VQA answer
                  normalisation (:func:`normalize_vqa_answer`) (Antol et al., "VQA", ICCV 2015, Sec. 3;
                  Goyal et al., "Making the V in VQA Matter", CVPR 2017).
exact match       :func:`exact_match`: 1 if the stripped, case-folded answer equals one of the targets.
COCO captions     :func:`cider_d`: CIDEr-D (Vedantam et al., "CIDEr", CVPR 2015, Sec. 4 and 8.1), by
                  ``pycocoevalcap``'s scorer, the implementation the COCO caption server runs.
================  ==========================================================================================

Edge cases, all tested: an empty prediction scores 0 against a non-empty target (and 1 against an
empty one for ANLS); numbers with units (``"12 kg"``) are not numbers for the relaxed match; a
target of 0 falls back to the exact match (a relative error to 0 is undefined).
"""

from __future__ import annotations

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


# ---- VQA accuracy -------------------------------------------------------------------------------
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The VQA normalisation restores apostrophes of contractions written without them ("dont" -> "don't").
_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've "
    "she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll we're we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've").split()}


def normalize_vqa_answer(answer: str) -> str:
    """The VQA answer normalisation, applied to the prediction and every ground truth (as the
    EvalAI answer processor does): whitespace; each punctuation mark dropped where it touches a
    space in the answer (or the answer has a comma inside a number, ``1,000``), else made a space;
    periods not followed by a digit dropped; lower case; number words to digits; articles dropped;
    contractions given their apostrophe."""
    original = answer.replace("\n", " ").replace("\t", " ").strip()
    drop_all = bool(_COMMA_BETWEEN_DIGITS.search(original))
    text = original
    for p in _PUNCTUATION:
        text = text.replace(p, "" if drop_all or f"{p} " in original or f" {p}" in original else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 in VQA v2 and TextVQA)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    golds = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for left_out in range(len(golds)):
        matches = sum(1 for i, g in enumerate(golds) if i != left_out and g == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


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
