"""Answer spans: from start/end logits over a context's windows to an answer, and its score.

Decoding (the same in evaluation and serving): in each window, the ``n_best`` highest start
and end logits over *context* tokens give candidate spans (end ≥ start, at most
``max_answer_length`` tokens); a span scores start + end logit, and the best span over all
windows of an example is its answer. The no-answer score is the CLS position's start + end
logit, its lowest over the windows (the window that sees the most of the answer decides).
With unanswerable questions allowed, the answer is empty when the no-answer score beats the
best span by more than ``null_score_threshold``.

Scoring follows the official SQuAD evaluation: answers are normalised (lower case, no
punctuation, no articles a/an/the, single spaces); exact match and token F1 take the best
over the gold answers; an unanswerable question's only gold answer is "" (SQuAD v2.0).
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

import numpy as np

NULL_POSITION = 0  # the CLS token: where a window without the answer points
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in _golds(gold))


def token_f1(prediction: str, gold: list[str]) -> float:
    return max(_f1(prediction, g) for g in _golds(gold))


def _golds(gold: list[str]) -> list[str]:
    """Gold answers that survive normalisation; none left means "no answer" (SQuAD v2.0)."""
    return [g for g in gold if normalize_answer(g)] or [""]


def _f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:  # an empty answer is right only when nothing is wanted
        return float(predicted == wanted)
    same = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Span:
    """An answer found in one window: character offsets into the context and its score."""

    start: int  # first character
    end: int  # one past the last character
    score: float  # start + end logit
    probability: float  # start × end probability within its window
    window: int


def window_best(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    char_start: np.ndarray,
    char_end: np.ndarray,
    max_answer_length: int,
    n_best: int = 20,
) -> tuple[Span | None, float, float]:
    """The best span of one window (None if it has no valid one), its no-answer score and
    no-answer probability. ``char_start``/``char_end`` are -1 where a token is not context."""
    p_start, p_end = _softmax(start_logits), _softmax(end_logits)
    null = _null(start_logits, end_logits)
    null_probability = float(p_start[NULL_POSITION] * p_end[NULL_POSITION])
    context = char_start >= 0
    if not context.any():
        return None, null, null_probability
    starts = _top(start_logits, context, n_best)
    ends = _top(end_logits, context, n_best)
    best: tuple[float, int, int] | None = None
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    if best is None:
        return None, null, null_probability
    score, s, e = best
    span = Span(int(char_start[s]), int(char_end[e]), score, float(p_start[s] * p_end[e]), -1)
    return span, null, null_probability


def best_answer(
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    max_answer_length: int,
    unanswerable: bool,
    null_score_threshold: float = 0.0,
    n_best: int = 20,
) -> tuple[Span | None, float]:
    """The answer over all windows of one example (None: no answer) and the no-answer
    probability of the window whose no-answer score is lowest."""
    best: Span | None = None
    null, null_probability = float("inf"), 0.0
    for w, (start_logits, end_logits, char_start, char_end) in enumerate(windows):
        span, window_null, window_null_p = window_best(
            start_logits, end_logits, char_start, char_end, max_answer_length, n_best
        )
        if window_null < null:
            null, null_probability = window_null, window_null_p
        if span is not None and (best is None or span.score > best.score):
            best = Span(span.start, span.end, span.score, span.probability, w)
    if best is None:
        return None, null_probability
    if unanswerable and null - best.score > null_score_threshold:
        return None, null_probability
    return best, null_probability


def _top(logits: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    candidates = np.flatnonzero(allowed)
    return candidates[np.argsort(-logits[candidates], kind="stable")[:n]]


def _null(start_logits: np.ndarray, end_logits: np.ndarray) -> float:
    return float(start_logits[NULL_POSITION] + end_logits[NULL_POSITION])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
