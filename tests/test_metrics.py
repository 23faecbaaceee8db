"""Metric functions against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from hubtool.stages import metrics as m

OPTS = {"A": "a red circle", "B": "a blue square", "C": "a green triangle", "D": "dark red circle"}


@pytest.mark.parametrize(
    "text, want",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) a green triangle", "C"),
        ("The answer is D.", "D"),
        ("Answer: (B)", "B"),
        ("answer: c", None),  # a lowercase letter after "answer" is not an option letter
        ("I think it is C because of the color.", "C"),
        ("A", "A"),
        ("A. a red circle", "A"),
        ("A blue square is shown.", "B"),  # leading "A" is the article; the option text decides
        ("a blue square", "B"),
        ("It could be B or C.", None),  # two letters: ambiguous
        ("dark red circle", "D"),  # "red circle" is inside it: the longer option wins
        ("nothing like the options", None),
        ("", None),
    ],
)
def test_extract_choice(text, want):
    assert m.extract_choice(text, OPTS) == want


def test_extract_choice_ignores_letters_that_are_not_options():
    assert m.extract_choice("E", {"A": "x", "B": "y"}) is None
    assert m.extract_choice("The answer is E", {"A": "x", "B": "y"}) is None


@pytest.mark.parametrize(
    "text, want",
    [
        ("Yes", "yes"),
        ("No, there is not.", "no"),
        ("yes.", "yes"),
        ("Yes and no", None),
        ("maybe", None),
        ("", None),
    ],
)
def test_extract_yes_no(text, want):
    assert m.extract_yes_no(text) == want


def test_yes_no_scores_hand_computed():
    golds = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "no", None]
    s = m.yes_no_scores(preds, golds)
    # tp=2 fn=1 fp=1 (said yes) + 1 (unreadable on a "no") = 2, tn=1
    assert (s.tp, s.fn, s.fp, s.tn, s.unknown) == (2, 1, 2, 1, 1)
    assert s.accuracy == pytest.approx(3 / 6)
    assert s.precision == pytest.approx(2 / 4)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # = 4/7
    assert s.f1 == pytest.approx(4 / 7)
    assert s.yes_ratio == pytest.approx(3 / 6)


def test_yes_no_scores_no_positive_predictions():
    s = m.yes_no_scores(["no", "no"], ["yes", "no"])
    assert (s.precision, s.recall, s.f1, s.accuracy) == (0.0, 0.0, 0.0, 0.5)


@pytest.mark.parametrize(
    "raw, want",
    [
        ("The Dog", "dog"),
        ("two dogs!", "2 dogs"),
        ("an apple, a pear", "apple pear"),
        ("dont stop.", "don't stop"),
        ("3.14", "3.14"),
        ("1,000", "1000"),
        ("  Yes\n", "yes"),
        ("hello-world", "hello world"),
        ("(stop)", "stop"),
    ],
)
def test_normalize_vqa_answer(raw, want):
    assert m.normalize_vqa_answer(raw) == want


def test_vqa_accuracy_short_lists():
    assert m.vqa_accuracy("Stop", ["stop"]) == pytest.approx(1 / 3)
    assert m.vqa_accuracy("stop.", ["stop", "Stop", "stop sign"]) == pytest.approx(2 / 3)
    assert m.vqa_accuracy("two", ["2", "2", "2", "3"]) == 1.0
    assert m.vqa_accuracy("yield", ["stop"]) == 0.0
    assert m.vqa_accuracy("x", []) == 0.0


def test_vqa_accuracy_ten_answers_leave_one_out():
    # 3 of 10 humans said "stop": 3 subsets (that leave out a "stop") see 2 matches -> 2/3, 7 see 3 -> 1
    answers = ["stop"] * 3 + ["go"] * 7
    assert m.vqa_accuracy("stop", answers) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)  # 0.9
    assert m.vqa_accuracy("go", answers) == 1.0
    assert m.vqa_accuracy("stop", ["stop"] + ["go"] * 9) == pytest.approx(0.3)


def test_short_answer():
    assert m.short_answer("The answer is Stop.\nmore") == "Stop"
    assert m.short_answer("  ") == ""


def test_mean_stderr_hand_computed():
    xs = [1.0, 0.0, 1.0, 1.0]
    # mean 0.75, sample var = (3*0.0625 + 0.5625)/3 = 0.25, se = sqrt(0.25/4) = 0.25
    assert m.mean(xs) == 0.75
    assert m.mean_stderr(xs) == pytest.approx(0.25)
    assert m.mean_stderr([1.0]) is None
    assert math.isnan(m.mean([]))


def test_bootstrap_stderr_is_reproducible_and_sane():
    xs = [1.0, 0.0] * 50
    a = m.bootstrap_stderr(m.mean, xs, iters=400)
    b = m.bootstrap_stderr(m.mean, xs, iters=400)
    assert a == b
    assert a == pytest.approx(m.mean_stderr(xs), rel=0.25)  # ~0.05
    assert m.bootstrap_stderr(m.mean, [1.0]) is None


def test_perplexity_and_its_stderr_hand_computed():
    p = m.perplexity([2.0, 4.0], [2, 2])
    # r = 6/4 = 1.5; residuals y - r x = -1, 1; var = 2 / (2*1*4) = 0.25; se(r) = 0.5
    assert p.nll == pytest.approx(1.5)
    assert p.value == pytest.approx(math.exp(1.5))
    assert p.stderr == pytest.approx(math.exp(1.5) * 0.5)
    assert (p.tokens, p.chunks) == (4, 2)
    one = m.perplexity([3.0], [3])
    assert one.value == pytest.approx(math.e) and one.stderr is None
    with pytest.raises(ValueError):
        m.perplexity([], [])


@pytest.mark.parametrize(
    "ref, other, identical, first, share",
    [
        ([1, 2, 3], [1, 2, 3], True, None, 1.0),
        ([1, 2, 3], [1, 5, 3], False, 1, 2 / 3),
        ([1, 2, 3, 4], [1, 2], False, 2, 2 / 4),
        ([], [], True, None, 1.0),
        ([], [7], False, 0, 0.0),
    ],
)
def test_token_agreement(ref, other, identical, first, share):
    a = m.token_agreement(ref, other)
    assert (a.identical, a.first_diff) == (identical, first)
    assert a.match_share == pytest.approx(share)
