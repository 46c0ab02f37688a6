"""Entity spans from tag sequences, scored as conlleval and seqeval score them.

Accepted schemes: IOB1 (CoNLL-2003's original), IOB2/BIO and IOBES. A chunk starts and ends
by the conlleval rules (an I- after O or after another type starts a chunk; E-/S- end one),
so IOB1 input and ill-formed sequences give the same entities seqeval finds. Counts per type
(true positives, predicted, gold) are additive over sentences and workers.
"""

from __future__ import annotations

import re

TAG = re.compile(r"^(?:O|[BIES]-.+)$")
PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' → ('B', 'PER'); 'O' → ('O', '')."""
    if tag == "O":
        return "O", ""
    return tag[0], tag[2:]


def entity_types(tags) -> list[str]:
    """The entity types a tag set names, sorted."""
    return sorted({split_tag(t)[1] for t in tags if t != "O"})


def ordered_tags(tags) -> list[str]:
    """A stable order for tag names found in data: O first, then by type, then B I E S."""
    rest = sorted(
        {t for t in tags if t != "O"}, key=lambda t: (split_tag(t)[1], PREFIX_ORDER[t[0]])
    )
    return (["O"] if "O" in set(tags) else []) + rest


def _ends(prev: str, prev_type: str, tag: str, type_: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != type_


def _starts(prev: str, prev_type: str, tag: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if tag in ("E", "I") and prev in ("E", "S", "O"):
        return True
    return tag != "O" and prev_type != type_


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) word positions of each chunk, inclusive."""
    chunks = []
    prev, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        kind, type_ = split_tag(tag)
        if _ends(prev, prev_type, kind, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev, prev_type, kind, type_):
            begin = i
        prev, prev_type = kind, type_
    return chunks


def count_entities(gold: list[str], pred: list[str], types: list[str]) -> list[float]:
    """[tp, predicted, gold] for each type (in ``types`` order), for one sentence."""
    true_spans, pred_spans = set(entities(gold)), set(entities(pred))
    out = []
    for t in types:
        g = {s for s in true_spans if s[0] == t}
        p = {s for s in pred_spans if s[0] == t}
        out += [float(len(g & p)), float(len(p)), float(len(g))]
    return out


def f1(tp: float, predicted: float, gold: float) -> tuple[float, float, float]:
    """Precision, recall, F1 (0 where undefined, as seqeval's zero_division=0)."""
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    score = 2 * tp / (predicted + gold) if predicted + gold else 0.0
    return precision, recall, score
