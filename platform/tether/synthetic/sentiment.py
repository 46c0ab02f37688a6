"""Synthetic binary sentiment data, generated from tether's own templates and word lists.

This is a SYNTHETIC toy dataset for smoke-testing fine-tuning runs. It is not a real
benchmark and numbers on it say nothing about real-world sentiment quality. No third-party
dataset is used or reproduced; every sentence is assembled from the lists below.

Each example is ``{"text": str, "label": int}`` with label 0 = negative, 1 = positive
(see ``LABEL_NAMES``). Labels are correct by construction (no label noise). Sentences come in
four kinds: plain statements ("The film was really superb."), negations that flip polarity
("The hotel was not bad." -> positive), contrasts whose label follows the clause after "but"
("The plot was dull but the acting was superb." -> positive) and stock phrases
("I want my money back."). A quarter of examples also get a neutral filler sentence.

Held-out phrasing: the validation split mixes in wording that never occurs in train, so a
model has to generalise (e.g. through pretrained embeddings) rather than memorise tokens.
All subjects, aspects, intensifiers, fillers and the train word lists are shared.

* Validation-only adjectives -- positive: splendid, marvelous, exquisite, phenomenal,
  sublime, magnificent; negative: dreadful, atrocious, abysmal, dismal, insipid, lackluster.
* Validation-only templates -- "Honestly, the <subject> felt <adj>." and
  "Although the <aspect> was <adj>, the <aspect> was <adj>." (label from the main clause).
* Validation-only phrases -- "I could not be happier.", "I would give it ten out of ten.",
  "I could not wait for it to end.", "I would give it zero stars."

Generation is deterministic: it uses ``random.Random(seed + split offset)`` and only ordered
containers, so the output does not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import random

LABEL_NAMES = ("negative", "positive")

_SPLIT_OFFSETS = {"train": 0, "validation": 1_000_003}
_HELDOUT_RATE = 0.35  # chance that validation picks held-out wording where it exists
_FILLER_RATE = 0.25
_KINDS = ("plain", "negated", "contrast", "phrase")
_KIND_WEIGHTS = (0.40, 0.20, 0.25, 0.15)

_ASPECTS = {
    "movie": ("plot", "acting", "soundtrack", "pacing"),
    "film": ("script", "cast", "cinematography", "ending"),
    "documentary": ("narration", "research", "editing", "footage"),
    "series": ("writing", "casting", "finale", "pilot"),
    "restaurant": ("food", "service", "decor", "dessert"),
    "cafe": ("coffee", "staff", "music", "pastry"),
    "hotel": ("room", "staff", "breakfast", "location"),
    "book": ("plot", "prose", "ending", "translation"),
    "novel": ("story", "dialogue", "ending", "narrator"),
    "album": ("production", "songwriting", "opening track", "vocal performance"),
    "phone": ("battery", "screen", "camera", "software"),
    "laptop": ("keyboard", "battery", "display", "trackpad"),
    "game": ("story", "gameplay", "art style", "multiplayer"),
    "concert": ("sound", "setlist", "venue", "encore"),
    "museum": ("collection", "audio guide", "layout", "gift shop"),
}
_SUBJECTS = tuple(_ASPECTS)
_DETERMINERS = ("the", "this", "that")
_INTENSIFIERS = ("really ", "quite ", "absolutely ", "truly ", "very ", "incredibly ", "pretty ")

# fmt: off
_ADJECTIVES = {  # polarity -> shared (train + validation) adjectives
    1: ("good", "great", "excellent", "wonderful", "superb", "fantastic", "brilliant",
        "enjoyable", "impressive", "lovely", "amazing", "outstanding", "delightful",
        "charming", "solid", "pleasant", "terrific", "memorable", "satisfying", "perfect",
        "refreshing", "beautiful", "stunning", "awesome", "fabulous", "remarkable",
        "engaging", "polished"),
    0: ("bad", "terrible", "awful", "boring", "dull", "disappointing", "poor", "mediocre",
        "horrible", "bland", "tedious", "annoying", "weak", "sloppy", "forgettable",
        "frustrating", "lousy", "unpleasant", "messy", "painful", "lifeless", "clumsy",
        "uninspired", "tiresome", "shoddy", "underwhelming", "awkward", "pointless"),
}
_HELDOUT_ADJECTIVES = {
    1: ("splendid", "marvelous", "exquisite", "phenomenal", "sublime", "magnificent"),
    0: ("dreadful", "atrocious", "abysmal", "dismal", "insipid", "lackluster"),
}
_PHRASES = {
    1: ("would recommend it to anyone", "loved every minute of it", "would gladly go again",
        "was pleasantly surprised", "would give it five stars", "enjoyed it a lot",
        "can't wait to try it again"),
    0: ("want my money back", "regret choosing it", "would not recommend it",
        "was bored the whole time", "would give it one star", "wasted my evening",
        "will never bother with it again"),
}
_HELDOUT_PHRASES = {
    1: ("could not be happier", "would give it ten out of ten"),
    0: ("could not wait for it to end", "would give it zero stars"),
}
# fmt: on
_NEGATIONS = ("was not", "wasn't", "was not at all")
_FILLERS = (
    "I went with a couple of friends.",
    "We tried it last weekend.",
    "It came out last year.",
    "A coworker told me about it.",
    "I had been meaning to try it for months.",
    "We paid full price.",
    "My sister picked it.",
    "It was my first time.",
    "We got there around noon.",
)


def sentiment_examples(split: str, n: int, seed: int = 0) -> list[dict]:
    """Return ``n`` synthetic ``{"text", "label"}`` examples for ``split`` (train/validation)."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed + _SPLIT_OFFSETS[split])
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return [{"text": _make_text(rng, label, split), "label": label} for label in labels]


def _make_text(rng: random.Random, label: int, split: str) -> str:
    kind = rng.choices(_KINDS, weights=_KIND_WEIGHTS)[0]
    builders = {
        "plain": _plain_sentence,
        "negated": _negated_sentence,
        "contrast": _contrast_sentence,
        "phrase": _phrase_sentence,
    }
    sentence = _capitalize(builders[kind](rng, label, split))
    return _add_filler(rng, sentence)


def _is_validation_heldout(rng: random.Random, split: str) -> bool:
    return split == "validation" and rng.random() < _HELDOUT_RATE


def _adjective(rng: random.Random, polarity: int, split: str) -> str:
    pool = _ADJECTIVES[polarity]
    if _is_validation_heldout(rng, split):
        pool = _HELDOUT_ADJECTIVES[polarity]
    return rng.choice(pool)


def _intensifier(rng: random.Random) -> str:
    return rng.choice(_INTENSIFIERS) if rng.random() < 0.5 else ""


def _subject_phrase(rng: random.Random) -> str:
    return f"{rng.choice(_DETERMINERS)} {rng.choice(_SUBJECTS)}"


def _plain_sentence(rng: random.Random, label: int, split: str) -> str:
    adjective = _intensifier(rng) + _adjective(rng, label, split)
    if _is_validation_heldout(rng, split):
        return f"honestly, the {rng.choice(_SUBJECTS)} felt {adjective}."
    if rng.random() < 0.3:
        return f"I thought {_subject_phrase(rng)} was {adjective}."
    return f"{_subject_phrase(rng)} was {adjective}."


def _negated_sentence(rng: random.Random, label: int, split: str) -> str:
    # Negation flips polarity: a negated negative adjective is positive and vice versa.
    adjective = _adjective(rng, 1 - label, split)
    return f"{_subject_phrase(rng)} {rng.choice(_NEGATIONS)} {adjective}."


def _contrast_sentence(rng: random.Random, label: int, split: str) -> str:
    # The first clause carries the opposite polarity; the label follows the main clause.
    subject = rng.choice(_SUBJECTS)
    first, second = rng.sample(_ASPECTS[subject], 2)
    opposite = _intensifier(rng) + _adjective(rng, 1 - label, split)
    main = _intensifier(rng) + _adjective(rng, label, split)
    if _is_validation_heldout(rng, split):
        return f"although the {first} was {opposite}, the {second} was {main}."
    if rng.random() < 0.3:
        return f"the {first} was {opposite}, but overall the {subject} was {main}."
    return f"the {first} was {opposite} but the {second} was {main}."


def _phrase_sentence(rng: random.Random, label: int, split: str) -> str:
    pool = _PHRASES[label]
    if _is_validation_heldout(rng, split):
        pool = _HELDOUT_PHRASES[label]
    return f"I {rng.choice(pool)}."


def _add_filler(rng: random.Random, sentence: str) -> str:
    if rng.random() >= _FILLER_RATE:
        return sentence
    filler = rng.choice(_FILLERS)
    return f"{filler} {sentence}" if rng.random() < 0.5 else f"{sentence} {filler}"


def _capitalize(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]
