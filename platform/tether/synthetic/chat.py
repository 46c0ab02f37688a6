"""Synthetic chat SFT data: sentiment classification as an answer, in a fixed house style.

A SYNTHETIC toy set for fine-tuning a chat LLM offline. Each example is one user turn asking
for the sentiment of a review (written by ``synthetic.sentiment``, with its held-out phrasing
in validation) and one assistant turn answering in the house style, exactly
``Sentiment: positive.`` or ``Sentiment: negative.``. What the model learns is narrow and
checkable: the answer format and the label. A general chat model answers in its own words
and is often wrong on negations and contrasts; after SFT it answers in one line. How much of
its general ability survives is what ``eval/forgetting`` measures.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
"""

from __future__ import annotations

import random

from tether.synthetic.sentiment import LABEL_NAMES, sentiment_examples

_ASKS = (
    "What is the sentiment of this review? {text}",
    "Classify the sentiment of this review: {text}",
    "Is this review positive or negative? {text}",
    "Review: {text} Sentiment?",
)
_HELDOUT_ASKS = ("Tell me whether this review is positive or negative: {text}",)
_SPLIT_OFFSETS = {"train": 0, "validation": 3_000_017}


def answer(label: int) -> str:
    """The house-style answer for a label id."""
    return f"Sentiment: {LABEL_NAMES[label]}."


def chat_examples(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` one-turn chats of one split ('train' or 'validation')."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rng = random.Random(seed + _SPLIT_OFFSETS[split])
    reviews = sentiment_examples(split, n, seed)
    out = []
    for review in reviews:
        asks = _ASKS + (_HELDOUT_ASKS if split == "validation" else ())
        question = rng.choice(asks).format(text=review["text"])
        out.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer(review["label"])},
                ]
            }
        )
    return out
