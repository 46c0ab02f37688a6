"""tether's own generated datasets, so every task runs offline (smoke tests, not benchmarks).

    sentiment  sequence-classification: {"text", "label"}            (synthetic/sentiment.py)
    entities   token-classification:    {"tokens", "ner_tags"} IOB2  (synthetic/entities.py)
    chat       causal-lm:               {"messages": [...]}          (synthetic/chat.py)
    qa         question-answering:      {"id", "title", "context",       (synthetic/qa.py)
                                         "question", "answers"} SQuAD
    qa-v2      question-answering:      as qa, a third unanswerable      (synthetic/qa.py)
                                         (empty answers), SQuAD 2.0

Every generator is deterministic (``random.Random`` seeded per split, ordered containers only)
and its validation split uses held-out phrasing or names that never occur in train.
"""

from __future__ import annotations

from collections.abc import Callable

from tether.synthetic.entities import ENTITY_TAGS, entity_examples
from tether.synthetic.qa import qa_examples
from tether.synthetic.sentiment import LABEL_NAMES, sentiment_examples

__all__ = [
    "LABEL_NAMES",
    "ENTITY_TAGS",
    "sentiment_examples",
    "entity_examples",
    "qa_examples",
    "generate",
]


def _chat(split: str, n: int, seed: int = 0) -> list[dict]:
    from tether.synthetic.chat import chat_examples

    return chat_examples(split, n, seed)


def _qa_v2(split: str, n: int, seed: int = 0) -> list[dict]:
    return qa_examples(split, n, seed, unanswerable_rate=1 / 3)


GENERATORS: dict[str, Callable[[str, int, int], list[dict]]] = {
    "sentiment": sentiment_examples,
    "entities": entity_examples,
    "chat": _chat,
    "qa": qa_examples,
    "qa-v2": _qa_v2,
}
# the names of datasets whose labels are class ids (as a hub ClassLabel); entity tags are
# names already
CLASS_NAMES: dict[str, tuple[str, ...]] = {"sentiment": LABEL_NAMES}


def generate(name: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of the named synthetic dataset's ``split`` ('train' or 'validation')."""
    return GENERATORS[name](split, n, seed)
