"""Metric functions for the eval stage: answer extraction, VQA normalization, yes/no scores, standard errors.

Pure Python (no model, no torch), so each can be checked against hand-computed cases. Values are
fractions in [0, 1]; the card decides how to show them.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# -- standard errors -------------------------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean (nan for an empty sequence)."""
    return sum(xs) / len(xs) if xs else float("nan")


def mean_stderr(xs: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (n-1) over sqrt(n); None below 2 samples."""
    n = len(xs)
    if n < 2:
        return None
    m = mean(xs)
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return math.sqrt(var / n)


def bootstrap_stderr(
    fn: Callable[[Sequence], float], items: Sequence, iters: int = 1000, seed: int = 1234
) -> float | None:
    """Standard error of ``fn(items)`` by resampling ``items`` with replacement (seeded, reproducible)."""
    n = len(items)
    if n < 2:
        return None
    rng = random.Random(seed)
    vals = [fn([items[rng.randrange(n)] for _ in range(n)]) for _ in range(iters)]
    vals = [v for v in vals if not math.isnan(v)]
    if len(vals) < 2:
        return None
    m = mean(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# -- perplexity ------------------------------------------------------------------------------------


@dataclass
class Perplexity:
    """Token-weighted perplexity over chunks, with its standard error (ratio estimator + delta method)."""

    value: float
    stderr: float | None
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int
    chunks: int


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> Perplexity:
    """Perplexity exp(sum NLL / sum tokens) of scored chunks; stderr from the spread of per-chunk NLL.

    The mean NLL per token is a ratio estimator r = sum(y)/sum(x); its variance is
    sum((y_i - r x_i)^2) / (n (n-1) xbar^2), and the delta method gives se(ppl) = ppl * se(r).
    """
    if len(nll_sums) != len(token_counts):
        raise ValueError("nll_sums and token_counts differ in length")
    total = sum(token_counts)
    if total == 0:
        raise ValueError("no tokens scored")
    r = sum(nll_sums) / total
    ppl = math.exp(r)
    n = len(nll_sums)
    se = None
    if n >= 2:
        xbar = total / n
        var = sum((y - r * x) ** 2 for y, x in zip(nll_sums, token_counts, strict=True)) / (
            n * (n - 1) * xbar**2
        )
        se = ppl * math.sqrt(var)
    return Perplexity(value=ppl, stderr=se, nll=r, tokens=total, chunks=n)


# -- multiple choice -------------------------------------------------------------------------------

_PREFIXES = re.compile(
    r"(?:the\s+)?(?:correct\s+|best\s+|final\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*"
    r"(?:option\s+)?[(\[]?([A-Z])[)\].,:]?(?![A-Za-z])",
    re.IGNORECASE,
)


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None when it names none or several.

    In order: an explicit "answer is B"/"Answer: (B)"; a lone letter at the start ("B", "B.", "(B) ...");
    exactly one option letter standing alone among the words (a leading "A" followed by more words is
    read as the article); finally exactly one option's text appearing in the answer.
    """
    letters = [k for k in options if len(k) == 1 and k.isupper()]
    s = text.strip()
    if not s:
        return None
    m = _PREFIXES.search(s)
    if m and m.group(1).upper() in letters and m.group(1).isupper():
        return m.group(1).upper()
    m = re.match(r"^[(\[]?([A-Z])(?:[)\].:,]|\s*$)", s)
    if m and m.group(1) in letters:
        return m.group(1)
    words = re.sub(r"[.()\[\],:;!*#{}\"'`]", " ", s).split()
    found = []
    for i, w in enumerate(words):
        if w in letters and w not in found:
            if w == "A" and i < len(words) - 1 and not _letter_marked(s, "A"):
                continue  # most likely the article
            found.append(w)
    if len(found) == 1:
        return found[0]
    if found:
        return None
    low = s.lower()
    hits = [k for k in letters if str(options[k]).strip() and str(options[k]).strip().lower() in low]
    if len(hits) > 1:  # prefer the longest option text when one contains another ("red" vs "dark red")
        hits.sort(key=lambda k: len(str(options[k])), reverse=True)
        longest = str(options[hits[0]]).strip().lower()
        if all(str(options[k]).strip().lower() in longest for k in hits[1:]):
            return hits[0]
        return None
    return hits[0] if hits else None


def _letter_marked(s: str, letter: str) -> bool:
    """Whether a letter appears in a way that marks it as an option: "(A)", "A.", "A)", "A:"."""
    return re.search(rf"(?:[(\[]{letter}[)\]])|(?:\b{letter}[.):](?:\s|$))", s) is not None


# -- yes / no --------------------------------------------------------------------------------------


def extract_yes_no(text: str) -> str | None:
    """ "yes", "no", or None when the answer says neither or both."""
    words = re.sub(r"[^a-z\s]", " ", text.lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "yes"
    if no and not yes:
        return "no"
    return None


@dataclass
class YesNoScores:
    """POPE-style scores with "yes" as the positive class."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    tp: int
    fp: int
    tn: int
    fn: int
    unknown: int


def yes_no_scores(preds: Sequence[str | None], golds: Sequence[str]) -> YesNoScores:
    """Accuracy, precision, recall, F1 with "yes" positive; an unreadable answer (None) is always wrong.

    An unreadable answer to a "yes" question is a false negative, to a "no" question a false positive.
    """
    tp = fp = tn = fn = unk = 0
    for p, g in zip(preds, golds, strict=True):
        gold_yes = g.strip().lower() == "yes"
        unk += p is None
        if gold_yes:
            tp += p == "yes"
            fn += p != "yes"
        else:
            tn += p == "no"
            fp += p != "no"
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    said_yes = sum(p == "yes" for p in preds)
    return YesNoScores(
        accuracy=(tp + tn) / n if n else float("nan"),
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=said_yes / n if n else float("nan"),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        unknown=unk,
    )


# -- open VQA --------------------------------------------------------------------------------------

_CONTRACTIONS = {
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
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # a period not inside a number
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA answer normalization (EvalAI): punctuation, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digits_articles(text)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers, after normalization.

    min(#matching answers / 3, 1). With the standard 10 answers per question, the official score
    averages that over the 10 subsets of 9 answers (leave one out), as VQA/TextVQA and VLMEvalKit do.
    """
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if not gts:
        return 0.0
    if len(gts) >= 10:
        scores = []
        for i in range(len(gts)):
            others = gts[:i] + gts[i + 1 :]
            scores.append(min(1.0, sum(g == pred for g in others) / 3))
        return mean(scores)
    return min(1.0, sum(g == pred for g in gts) / 3)


def short_answer(text: str) -> str:
    """The first line of a generated answer, stripped of a leading "Answer:" and trailing period."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^(?:the\s+)?answer\s*(?:is|:)\s*", "", line, flags=re.IGNORECASE)
    return line.strip().rstrip(".").strip()


LETTERS = tuple(string.ascii_uppercase)


# -- int4 vs 16-bit agreement ------------------------------------------------------------------------


@dataclass
class TokenAgreement:
    """How one greedy output matches the reference output token by token."""

    identical: bool
    first_diff: int | None  # index of the first differing token (None when identical)
    match_share: float  # positions with the same token / length of the longer output


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> TokenAgreement:
    """Compare two token-id sequences position by position (a missing position counts as a mismatch)."""
    ref, oth = list(reference), list(other)
    longest = max(len(ref), len(oth))
    if longest == 0:
        return TokenAgreement(True, None, 1.0)
    same = sum(a == b for a, b in zip(ref, oth, strict=False))
    first = next((i for i, (a, b) in enumerate(zip(ref, oth, strict=False)) if a != b), None)
    if first is None and len(ref) != len(oth):
        first = min(len(ref), len(oth))
    return TokenAgreement(ref == oth, first, same / longest)
