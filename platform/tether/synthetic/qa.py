"""Synthetic extractive question answering (SQuAD-like), from tether's own templates and names.

A SYNTHETIC toy set for smoke-testing question-answering runs offline; numbers on it say
nothing about real reading comprehension (use SQuAD for that). Every context and question is
assembled from the lists below; no third-party text is reproduced.

Each example has the flat hub SQuAD layout::

    {"id": "qa-train-00017", "title": str, "context": str, "question": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]}}

A context is a short paragraph (4-7 sentences, 40-100 words, about 330 characters) of facts
about two or three fictional people, in shuffled order, sometimes with a sentence about a
place or an organisation that answers nothing. Facts are of seven kinds (``FACTS``):
birthplace, birth year, occupation, employer, sibling, a city they moved to, an instrument.
Usually another person in the same context has a fact of the kind asked about, so a model
has to match the question's subject rather than pick any town or year. The question asks
about exactly one fact of one person; the answer is a 1-4 word span, and ``answer_start`` is,
by construction, its offset in the sentence that states that fact (a town can be one
person's birthplace and another's new home, so the same string may occur twice). Values of
one kind are distinct within a context, and no value occurs inside another. Some names and
places are accented or CJK ("Zoë Müller", "Łazienko", "青山"), so offsets are counted in
characters (code points), not bytes.

Validation differs from train as SQuAD dev does:

* a third of its questions use phrasings that never occur in train
  (``HELDOUT_QUESTION_TEMPLATES``, e.g. "In which town did {name} come into the world?");
* about a third of its names, places and organisations come from held-out lists;
* an answer may have a second gold span that also occurs in the context at its own offset
  ("1871" and "in 1871", "Tarsk" and "the town of Tarsk"). Train has exactly one answer.

With ``unanswerable_rate > 0`` (SQuAD 2.0 style) that share of questions cannot be answered
from the context: they ask about a fact the context does not state for that person (while
stating it for someone else), or about a person who is not in the context (often sharing a
surname with one who is). Their answers are ``{"text": [], "answer_start": []}``.

Generation is deterministic: it uses ``random.Random(seed + split offset)`` and only ordered
containers, so the output does not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import accumulate

FACTS = ("birthplace", "birth_year", "occupation", "employer", "sibling", "moved_to", "instrument")

_SPLIT_OFFSETS = {"train": 0, "validation": 4_000_037}
_HELDOUT_NAME_RATE = 0.35  # chance that validation draws a name/place/org from a held-out list
_HELDOUT_QUESTION_RATE = 1 / 3
_VARIANT_RATE = 0.5  # validation: chance of a second gold answer where the sentence has one
_DISTRACTOR_RATE = 0.75  # chance that another person has a fact of the asked kind
_SHARED_PLACE_RATE = 0.15  # chance that a birthplace/new home repeats another person's town
_FILLER_RATE = 0.3
_MIN_WORDS = 40
_MAX_SENTENCES = 7
_ABSENT_PERSON_RATE = 0.3  # share of unanswerable questions about a person not in the context

# fmt: off
_FIRST = ("Anna", "Peter", "Maria", "Jonas", "Greta", "Omar", "Sofia", "David", "Yuki",
          "Carlos", "Elena", "Marcus", "Priya", "Tomas", "Ingrid", "Ahmed", "Clara", "Felix",
          "Nina", "Pavel", "Zoë", "Renée", "Jörg", "Inés", "Søren", "Agnès", "Hiroshi")
_LAST = ("Miller", "Schmidt", "Rossi", "Tanaka", "Okafor", "Novak", "Garcia", "Lindqvist",
         "Dubois", "Kowalski", "Haddad", "Brennan", "Silva", "Moreau", "Petrov", "Hansen",
         "Müller", "Øvergaard", "Kovačić", "Brändli", "Szőke", "Łukasik")
_HELDOUT_FIRST = ("Beatriz", "Kwame", "Astrid", "Rafael", "Mei", "Dmitri", "Aisha", "Lukas",
                  "Chloé", "Håkon")
_HELDOUT_LAST = ("Oyelaran", "Castellano", "Virtanen", "Nakamura", "Whitfield", "Ibáñez",
                 "Żelazny")
_PLACES = ("Tarsk", "Velmar", "Brenholt", "Lindfjord", "Dunmere", "Ashcombe", "Kelvaro",
           "Pellwick", "Marrowby", "Quenby", "Östervik", "Łazienko", "Brückental",
           "Saint-Aurèle", "Vállenes", "青山", "白川", "北原")
_HELDOUT_PLACES = ("Quorran", "Myrefell", "Hålvik", "Sainte-Lucène", "Pradówka", "Orlesk",
                   "南浜")
_ORG_HEADS = ("Bluestone", "Harrow", "Kestrel", "Meridian", "Oakhaven", "Silverline",
              "Copperfield", "Greywater", "Lumière")
_ORG_TAILS = ("Mills", "Press", "Ferries", "Ironworks", "Bank", "Glassworks", "Traders",
              "Observatory")
_HELDOUT_ORG_HEADS = ("Ambervale", "Stonereach", "Mirelight", "Fairhaven")
_HELDOUT_ORG_TAILS = ("Foundry", "Printworks")
_OCCUPATIONS = ("clockmaker", "ferry pilot", "beekeeper", "cartographer", "glassblower",
                "schoolteacher", "bookbinder", "stonemason", "lighthouse keeper",
                "pharmacist", "tailor", "surveyor", "baker", "engineer", "archivist",
                "midwife", "locksmith", "translator")
_INSTRUMENTS = ("cello", "violin", "viola", "accordion", "oboe", "harp", "zither", "bassoon",
                "mandolin", "clarinet", "trombone", "piano", "flute", "banjo", "double bass")
# fmt: on
_YEARS = (1850, 1999)
_PLACE_FACTS = ("birthplace", "moved_to")

# Context sentences, shared by both splits. "|" marks where a longer gold answer starts
# (validation only): "born in |the town of {value}" -> "Tarsk" or "the town of Tarsk".
STATEMENT_TEMPLATES = {
    "birthplace": (
        "{name} was born in {value}, a town of narrow streets.",
        "{name} was born in |the town of {value}.",
        "{value} is the birthplace of {name}, who rarely spoke of it.",
        "{name} was born and raised in {value}.",
    ),
    "birth_year": (
        "{name} was born |in {value}.",
        "Records show that {name} was born |in {value}, during a hard winter.",
        "The parish register lists the birth of {name} |in {value}.",
    ),
    "occupation": (
        "{name} worked as |{art} {value} for most of a long career.",
        "By trade, {name} was |{art} {value}, and a careful one.",
        "{name} trained as |{art} {value} and stayed in that line of work for decades.",
    ),
    "employer": (
        "{name} worked for {value}.",
        "{name} spent many years at {value}, mostly on the night shift.",
        "{name} took a job with |the firm {value} after leaving school.",
        "{value} employed {name} for over a decade.",
    ),
    "sibling": (
        "{name} had a younger sibling named {value}.",
        "The only sibling of {name} was called {value}.",
        "{value} was the older sibling of {name} and wrote to them every week.",
    ),
    "moved_to": (
        "{name} later moved to {value}.",
        "In later life {name} moved to |the city of {value}.",
        "{name} eventually settled in {value}, far from the coast.",
        "{name} left home young and moved to {value}.",
    ),
    "instrument": (
        "{name} played |the {value}.",
        "In the evenings {name} practised |the {value} for an hour or two.",
        "{name} was a keen player of |the {value}.",
        "{name} played |the {value} in a local band.",
    ),
}
_FILLERS = (  # sentences that state no fact about a person
    "{place} lies on a wide, slow river and is busy on market days.",
    "{place} is known for its autumn fair, which draws visitors from far away.",
    "{org} had its offices in {place} for many years.",
    "The archive of {org} burned down in {year}, and little of it survived.",
)

QUESTION_TEMPLATES = {
    "birthplace": (
        "Where was {name} born?",
        "In which town was {name} born?",
        "What is the birthplace of {name}?",
    ),
    "birth_year": (
        "When was {name} born?",
        "In what year was {name} born?",
        "What year was {name} born in?",
    ),
    "occupation": (
        "What was the occupation of {name}?",
        "What did {name} work as?",
        "What job did {name} have?",
    ),
    "employer": (
        "Which organisation did {name} work for?",
        "Who employed {name}?",
        "What was the name of the employer of {name}?",
    ),
    "sibling": ("Who was the sibling of {name}?", "What was the name of the sibling of {name}?"),
    "moved_to": (
        "Where did {name} move to?",
        "To which city did {name} move?",
        "Where did {name} settle later in life?",
    ),
    "instrument": ("Which instrument did {name} play?", "What instrument did {name} play?"),
}
HELDOUT_QUESTION_TEMPLATES = {  # validation only; never used in train
    "birthplace": (
        "In which town did {name} come into the world?",
        "Which place is {name} originally from?",
    ),
    "birth_year": (
        "In which year did {name} come into the world?",
        "What was the year of birth of {name}?",
    ),
    "occupation": ("What did {name} do for a living?", "Which trade did {name} follow?"),
    "employer": ("For which firm did {name} work?", "Which company gave {name} a job?"),
    "sibling": ("What was the sibling of {name} called?", "Who is named as a sibling of {name}?"),
    "moved_to": ("Where did {name} relocate?", "In which city did {name} end up living?"),
    "instrument": ("Which instrument could {name} play?", "What did {name} make music on?"),
}


def qa_examples(split: str, n: int, seed: int = 0, unanswerable_rate: float = 0.0) -> list[dict]:
    """``n`` SQuAD-layout examples of one split ('train' or 'validation').

    ``unanswerable_rate`` (0 to 1) is the exact share, rounded, of questions the context
    cannot answer; their ``answers`` lists are empty.
    """
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0.0 <= unanswerable_rate <= 1.0:
        raise ValueError(f"unanswerable_rate must be in [0, 1], got {unanswerable_rate}")
    rng = random.Random(seed + _SPLIT_OFFSETS[split])
    n_unanswerable = round(n * unanswerable_rate)
    answerable = [i >= n_unanswerable for i in range(n)]
    rng.shuffle(answerable)
    return [_example(rng, split, f"qa-{split}-{i:05d}", a) for i, a in enumerate(answerable)]


# --- one example ------------------------------------------------------------------------


def _example(rng: random.Random, split: str, example_id: str, answerable: bool) -> dict:
    used: list[str] = []  # every string placed so far, so that no value overlaps another
    people = _people(rng, split, rng.choice((2, 3)), used)
    fact = rng.choice(FACTS)
    absent = not answerable and rng.random() < _ABSENT_PERSON_RATE
    subject = -1 if absent else rng.randrange(len(people))
    values = _values(rng, split, _plan(rng, len(people), subject, fact, answerable), used)
    sentences = [
        ((i, kind), *_statement(rng, kind, people[i], value))
        for i, person_values in enumerate(values)
        for kind, value in person_values.items()
    ]
    # a filler sometimes, and as many as it takes to reach about 40 words
    while len(sentences) < _MAX_SENTENCES and (
        sum(len(text.split()) for _, text, _, _ in sentences) < _MIN_WORDS
        or rng.random() < _FILLER_RATE
    ):
        sentences.append((None, _filler(rng, split, used), 0, None))
    rng.shuffle(sentences)
    starts = list(accumulate((len(text) + 1 for _, text, _, _ in sentences), initial=0))
    answers = {"text": [], "answer_start": []}
    if answerable:
        k = next(k for k, sentence in enumerate(sentences) if sentence[0] == (subject, fact))
        answers = _answers(rng, split, *sentences[k][1:], starts[k], values[subject][fact])
    name = _absent_name(rng, split, people, used) if absent else people[subject]
    return {
        "id": example_id,
        "title": people[0],
        "context": " ".join(text for _, text, _, _ in sentences),
        "question": _question(rng, split, fact, name),
        "answers": answers,
    }


def _plan(
    rng: random.Random, n_people: int, subject: int, fact: str, answerable: bool
) -> list[list[str]]:
    """Kinds of fact per person: ``fact`` for ``subject`` iff answerable, usually for another.

    ``subject`` is -1 for a person not in the context. Everyone gets at least one fact; the
    paragraph gets 4-6 in all.
    """
    forbidden = None if answerable else (subject, fact)
    plan: list[list[str]] = [[] for _ in range(n_people)]
    if answerable:
        plan[subject].append(fact)
    if not answerable or rng.random() < _DISTRACTOR_RATE:
        plan[rng.choice([i for i in range(n_people) if i != subject])].append(fact)
    n_facts = rng.randint(n_people + 2, 6)
    while sum(map(len, plan)) < n_facts or not all(plan):
        i = rng.choice([j for j in range(n_people) if not plan[j]] or range(n_people))
        plan[i].append(rng.choice([k for k in FACTS if k not in plan[i] and (i, k) != forbidden]))
    return plan


def _values(
    rng: random.Random, split: str, plan: list[list[str]], used: list[str]
) -> list[dict[str, str]]:
    """One value per planned fact; values of one kind are distinct within the context."""
    values: list[dict[str, str]] = [{} for _ in plan]
    for i, kinds in enumerate(plan):
        for kind in kinds:
            shared = _shareable_place(values, i, kind)
            if shared and rng.random() < _SHARED_PLACE_RATE:
                values[i][kind] = rng.choice(shared)
            else:
                values[i][kind] = _fresh(lambda kind=kind: _draw(rng, split, kind), used)
    return values


def _shareable_place(values: list[dict[str, str]], i: int, kind: str) -> list[str]:
    """Towns another person was born in / moved to that person ``i`` may move to / be born in."""
    if kind not in _PLACE_FACTS:
        return []
    other_kind = _PLACE_FACTS[1 - _PLACE_FACTS.index(kind)]
    taken = {v[kind] for v in values if kind in v}
    towns = [v[other_kind] for j, v in enumerate(values) if j != i and other_kind in v]
    return [town for town in towns if town not in taken]


def _statement(rng: random.Random, kind: str, name: str, value: str) -> tuple[str, int, int | None]:
    """A sentence stating one fact, the value's offset in it and the longer variant's offset."""
    template = rng.choice(STATEMENT_TEMPLATES[kind])
    article = "an" if value[0] in "aeiou" else "a"
    before, after = template.replace("{name}", name).replace("{art}", article).split("{value}")
    variant_start = before.find("|")
    before = before.replace("|", "")
    return before + value + after, len(before), None if variant_start < 0 else variant_start


def _answers(
    rng: random.Random,
    split: str,
    sentence: str,
    value_start: int,
    variant_start: int | None,
    sentence_start: int,
    value: str,
) -> dict:
    """The gold span(s) of the fact stated in ``sentence``, with offsets into the context."""
    starts = [value_start]
    if split == "validation" and variant_start is not None and rng.random() < _VARIANT_RATE:
        starts.append(variant_start)
    end = value_start + len(value)
    return {
        "text": [sentence[start:end] for start in starts],
        "answer_start": [sentence_start + start for start in starts],
    }


def _question(rng: random.Random, split: str, fact: str, name: str) -> str:
    templates = QUESTION_TEMPLATES[fact]
    if split == "validation" and rng.random() < _HELDOUT_QUESTION_RATE:
        templates = HELDOUT_QUESTION_TEMPLATES[fact]
    return rng.choice(templates).format(name=name)


# --- names and values ---------------------------------------------------------------------


def _people(rng: random.Random, split: str, n: int, used: list[str]) -> list[str]:
    """``n`` full names with distinct first and last names."""
    return [
        f"{_fresh(lambda: _pick(rng, _FIRST, _HELDOUT_FIRST, split), used)} "
        f"{_fresh(lambda: _pick(rng, _LAST, _HELDOUT_LAST, split), used)}"
        for _ in range(n)
    ]


def _absent_name(rng: random.Random, split: str, people: list[str], used: list[str]) -> str:
    """A person not in the context; half the time sharing a surname with one who is."""
    first = _fresh(lambda: _pick(rng, _FIRST, _HELDOUT_FIRST, split), used)
    if rng.random() < 0.5:
        return f"{first} {rng.choice(people).split(' ', 1)[1]}"
    return f"{first} {_fresh(lambda: _pick(rng, _LAST, _HELDOUT_LAST, split), used)}"


def _filler(rng: random.Random, split: str, used: list[str]) -> str:
    """A sentence about a place or organisation that answers no question."""
    draws = {
        "place": lambda: _pick(rng, _PLACES, _HELDOUT_PLACES, split),
        "org": lambda: _org(rng, split),
        "year": lambda: str(rng.randint(*_YEARS)),
    }
    template = rng.choice(_FILLERS)
    return template.format(
        **{key: _fresh(draw, used) for key, draw in draws.items() if f"{{{key}}}" in template}
    )


def _draw(rng: random.Random, split: str, kind: str) -> str:
    if kind in _PLACE_FACTS:
        return _pick(rng, _PLACES, _HELDOUT_PLACES, split)
    if kind == "birth_year":
        return str(rng.randint(*_YEARS))
    if kind == "occupation":
        return rng.choice(_OCCUPATIONS)
    if kind == "employer":
        return _org(rng, split)
    if kind == "sibling":
        return _pick(rng, _FIRST, _HELDOUT_FIRST, split)
    return rng.choice(_INSTRUMENTS)


def _org(rng: random.Random, split: str) -> str:
    head = _pick(rng, _ORG_HEADS, _HELDOUT_ORG_HEADS, split)
    return f"{head} {_pick(rng, _ORG_TAILS, _HELDOUT_ORG_TAILS, split)}"


def _pick(rng: random.Random, shared: tuple[str, ...], heldout: tuple[str, ...], split: str) -> str:
    if split == "validation" and rng.random() < _HELDOUT_NAME_RATE:
        return rng.choice(heldout)
    return rng.choice(shared)


def _fresh(draw: Callable[[], str], used: list[str]) -> str:
    """A value from ``draw`` that neither contains nor is contained in a string in ``used``.

    So an answer never occurs inside another name or value ("Ana" in "Anna").
    """
    for _ in range(1000):
        value = draw()
        if not any(value in other or other in value for other in used):
            used.append(value)
            return value
    raise RuntimeError("ran out of distinct values")  # the lists are far longer than a context
