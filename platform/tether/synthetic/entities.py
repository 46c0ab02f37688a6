"""Synthetic named-entity data (token classification), from tether's own templates and names.

A SYNTHETIC toy set for smoke-testing NER runs offline; numbers on it say nothing about real
NER quality (use CoNLL-2003 for that: jobs/conll2003.yaml). Every sentence is assembled from
the lists below; no third-party text is reproduced.

Each example is ``{"tokens": [str, ...], "ner_tags": [str, ...]}`` with IOB2 tags over four
types, as in CoNLL-2003: PER (people), LOC (places), ORG (organisations), MISC (nationalities
and events). Tags are correct by construction.

Held-out names and phrasing: in validation, a third of the names come from lists that never
occur in train, and some sentences use templates train never sees, so a model must use
context (and pretrained embeddings) rather than memorise names.
"""

from __future__ import annotations

import random

ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
ENTITY_TAGS = ("O", *(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I")))

_SPLIT_OFFSETS = {"train": 0, "validation": 2_000_003}
_HELDOUT_RATE = 0.35
_HELDOUT_TEMPLATE_RATE = 0.3
_NO_ENTITY_RATE = 0.1

_FIRST = (
    "anna",
    "peter",
    "maria",
    "john",
    "lena",
    "omar",
    "sofia",
    "david",
    "yuki",
    "carlos",
    "elena",
    "marcus",
    "priya",
    "tom",
    "ingrid",
    "ahmed",
    "clara",
    "felix",
    "nina",
    "paul",
)
_LAST = (
    "miller",
    "schmidt",
    "rossi",
    "tanaka",
    "okafor",
    "novak",
    "garcia",
    "lindqvist",
    "dubois",
    "kowalski",
    "haddad",
    "brennan",
    "silva",
    "moreau",
    "petrov",
    "hansen",
)
_HELDOUT_FIRST = ("beatriz", "kwame", "astrid", "rafael", "mei", "dmitri", "aisha", "lukas")
_HELDOUT_LAST = ("oyelaran", "castellano", "virtanen", "nakamura", "abara", "whitfield")

_LOC = (
    "berlin",
    "paris",
    "new york",
    "madrid",
    "tokyo",
    "cairo",
    "lima",
    "oslo",
    "toronto",
    "sydney",
    "nairobi",
    "rome",
    "san diego",
    "hong kong",
    "france",
    "brazil",
    "kenya",
    "canada",
    "japan",
    "egypt",
)
_HELDOUT_LOC = (
    "porto alegre",
    "tbilisi",
    "quito",
    "lagos",
    "reykjavik",
    "chile",
    "vietnam",
    "ghana",
)

_ORG_HEADS = (
    "northwind",
    "bluestone",
    "meridian",
    "redwood",
    "silverline",
    "harbor",
    "summit",
    "crescent",
    "ironbridge",
    "lakeside",
)
_ORG_TAILS = ("bank", "airlines", "motors", "group", "energy", "united", "telecom", "foods")
_HELDOUT_ORG_HEADS = ("quillmark", "ambervale", "stonereach", "fairhaven")
_HELDOUT_ORG_TAILS = ("holdings", "pharma", "rovers")

_MISC = (
    "german",
    "brazilian",
    "japanese",
    "french",
    "kenyan",
    "world cup",
    "olympics",
    "tour de france",
    "canadian",
    "egyptian",
)
_HELDOUT_MISC = ("chilean", "vietnamese", "champions league", "ghanaian")

# slot tokens in braces are replaced by entities; everything else is an O token
_TEMPLATES = (
    "{PER} visited {LOC} on monday .",
    "{ORG} opened a new office in {LOC} .",
    "{PER} , a spokesman for {ORG} , said the deal was done .",
    "the {MISC} team beat {LOC} 2-1 on saturday .",
    "{PER} joined {ORG} in 1998 .",
    "shares of {ORG} rose 3 percent in {LOC} trading .",
    "{PER} and {PER} met in {LOC} to discuss the plan .",
    "{MISC} officials criticised {ORG} on tuesday .",
    "police in {LOC} arrested {PER} after the match .",
    "{PER} will play for {ORG} next season .",
    "{ORG} said profits fell in {LOC} .",
    "the {MISC} minister met {PER} in {LOC} .",
)
_HELDOUT_TEMPLATES = (
    "in {LOC} , {PER} told reporters that {ORG} would appeal .",
    "{ORG} hired {PER} as chief executive .",
    "{MISC} fans travelled to {LOC} to watch {PER} .",
)
_NO_ENTITY = (
    "the market closed higher on friday .",
    "prices rose by 2 percent last month .",
    "the talks will resume next week .",
    "it was not immediately clear what happened .",
)


def entity_examples(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` tagged sentences of one split ('train' or 'validation')."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rng = random.Random(seed + _SPLIT_OFFSETS[split])
    return [_sentence(rng, split) for _ in range(n)]


def _sentence(rng: random.Random, split: str) -> dict:
    if rng.random() < _NO_ENTITY_RATE:
        tokens = rng.choice(_NO_ENTITY).split()
        return {"tokens": tokens, "ner_tags": ["O"] * len(tokens)}
    heldout = split == "validation" and rng.random() < _HELDOUT_TEMPLATE_RATE
    template = rng.choice(_HELDOUT_TEMPLATES if heldout else _TEMPLATES)
    tokens, tags = [], []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            entity = _entity(rng, kind, split).split()
            tokens += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "ner_tags": tags}


def _pick(rng: random.Random, shared: tuple[str, ...], heldout: tuple[str, ...], split: str):
    if split == "validation" and rng.random() < _HELDOUT_RATE:
        return rng.choice(heldout)
    return rng.choice(shared)


def _entity(rng: random.Random, kind: str, split: str) -> str:
    if kind == "PER":
        last = _pick(rng, _LAST, _HELDOUT_LAST, split)
        if rng.random() < 0.3:
            return last
        return f"{_pick(rng, _FIRST, _HELDOUT_FIRST, split)} {last}"
    if kind == "LOC":
        return _pick(rng, _LOC, _HELDOUT_LOC, split)
    if kind == "ORG":
        head = _pick(rng, _ORG_HEADS, _HELDOUT_ORG_HEADS, split)
        return f"{head} {_pick(rng, _ORG_TAILS, _HELDOUT_ORG_TAILS, split)}"
    return _pick(rng, _MISC, _HELDOUT_MISC, split)
