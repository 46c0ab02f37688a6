"""Tests for the synthetic sentiment dataset generator."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from itertools import pairwise

import pytest

from tether.synthetic import LABEL_NAMES, sentiment_examples

HELD_OUT_ADJECTIVES = {
    "splendid", "marvelous", "exquisite", "phenomenal", "sublime", "magnificent",
    "dreadful", "atrocious", "abysmal", "dismal", "insipid", "lackluster",
}  # fmt: skip
SIMPLE = re.compile(r"(?:The|This|That) [a-z]+ (was|was not|wasn't) ([a-z]+)\.")
CONTRAST = re.compile(r"The [a-z ]+ was ([a-z]+) but the [a-z ]+ was ([a-z]+)\.")


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _vocab(examples: list[dict]) -> set[str]:
    return {token for ex in examples for token in _tokens(ex["text"])}


def _plain_adjective_labels(examples: list[dict]) -> dict[str, int]:
    labels = {}
    for ex in examples:
        match = SIMPLE.fullmatch(ex["text"])
        if match and match.group(1) == "was":
            labels.setdefault(match.group(2), ex["label"])
            assert labels[match.group(2)] == ex["label"]
    return labels


def test_examples_have_expected_shape():
    """Every example is a dict with a non-empty text and a label indexing LABEL_NAMES."""
    examples = sentiment_examples("train", 50)
    assert len(examples) == 50
    assert LABEL_NAMES == ("negative", "positive")
    for ex in examples:
        assert set(ex) == {"text", "label"}
        assert isinstance(ex["text"], str) and ex["text"].strip()
        assert ex["label"] in (0, 1)


def test_same_arguments_give_identical_output():
    """Calling twice with the same (split, n, seed) returns identical lists."""
    for split in ("train", "validation"):
        assert sentiment_examples(split, 300, seed=7) == sentiment_examples(split, 300, seed=7)


def test_different_seed_gives_different_output():
    """A different seed produces a different dataset."""
    assert sentiment_examples("train", 300, seed=0) != sentiment_examples("train", 300, seed=1)


def test_output_does_not_depend_on_python_hash_seed():
    """Generation is identical across interpreters started with different PYTHONHASHSEED."""
    code = "import json; from tether.synthetic import sentiment_examples as s; "
    code += "print(json.dumps(s('validation', 200, seed=3)))"
    outputs = []
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] == sentiment_examples("validation", 200, seed=3)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_classes_are_balanced(split):
    """Each class makes up between 40% and 60% of 1000 examples."""
    counts = Counter(ex["label"] for ex in sentiment_examples(split, 1000))
    assert 400 <= counts[0] <= 600 and 400 <= counts[1] <= 600


def test_bad_split_raises_value_error_naming_it():
    """An unknown split raises ValueError whose message names the bad value."""
    with pytest.raises(ValueError, match="test"):
        sentiment_examples("test", 10)


def test_validation_uses_held_out_phrasing():
    """Validation-only templates and adjectives occur in validation and never in train."""
    train_vocab = _vocab(sentiment_examples("train", 2000))
    val_vocab = _vocab(sentiment_examples("validation", 2000))
    val_only = val_vocab - train_vocab
    assert {"although", "felt", "honestly"} <= val_only
    assert len(HELD_OUT_ADJECTIVES & val_only) >= 6
    assert not HELD_OUT_ADJECTIVES & train_vocab


def test_most_validation_vocabulary_is_shared_with_train():
    """At least 80% of validation word types also appear in train."""
    train_vocab = _vocab(sentiment_examples("train", 2000))
    val_vocab = _vocab(sentiment_examples("validation", 2000))
    assert len(val_vocab & train_vocab) / len(val_vocab) >= 0.8


def test_many_distinct_sentences_are_possible():
    """5000 train examples contain at least 3000 distinct texts."""
    assert len({ex["text"] for ex in sentiment_examples("train", 5000)}) >= 3000


def test_negation_flips_label():
    """ "X was not ADJ" gets the opposite label of "X was ADJ", in both directions."""
    examples = sentiment_examples("train", 3000)
    adjective_labels = _plain_adjective_labels(examples)
    flipped = Counter()
    for ex in examples:
        match = SIMPLE.fullmatch(ex["text"])
        if match and match.group(1) != "was" and match.group(2) in adjective_labels:
            assert ex["label"] == 1 - adjective_labels[match.group(2)], ex
            flipped[ex["label"]] += 1
    assert flipped[0] >= 10 and flipped[1] >= 10  # "not good" -> 0 and "not bad" -> 1 both seen


def test_contrast_label_follows_clause_after_but():
    """In "A was X but B was Y" the label is Y's polarity, opposite to X's."""
    examples = sentiment_examples("train", 3000)
    adjective_labels = _plain_adjective_labels(examples)
    checked = 0
    for ex in examples:
        match = CONTRAST.fullmatch(ex["text"])
        if match and set(match.groups()) <= set(adjective_labels):
            first, second = (adjective_labels[word] for word in match.groups())
            assert ex["label"] == second == 1 - first, ex
            checked += 1
    assert checked >= 20


def _lexicon(examples: list[dict]) -> dict[str, int]:
    """Words clearly skewed towards one class in train, mapped to +1 / -1."""
    pos, neg = Counter(), Counter()
    for ex in examples:
        (pos if ex["label"] else neg).update(set(_tokens(ex["text"])))
    lexicon = {}
    for word in pos.keys() | neg.keys():
        total = pos[word] + neg[word]
        if total >= 5 and abs(pos[word] - neg[word]) / total > 0.3:
            lexicon[word] = 1 if pos[word] > neg[word] else -1
    return lexicon


def test_lexicon_counting_is_not_trivially_perfect():
    """Counting positive vs negative train-lexicon words scores below 95% on validation."""
    lexicon = _lexicon(sentiment_examples("train", 2000))
    validation = sentiment_examples("validation", 1000)
    correct = 0
    for ex in validation:
        score = sum(lexicon.get(token, 0) for token in _tokens(ex["text"]))
        correct += int((score > 0) == bool(ex["label"]))
    assert correct / len(validation) < 0.95


def _features(text: str) -> list[str]:
    tokens = _tokens(text)
    return tokens + [f"{a} {b}" for a, b in pairwise(tokens)]


def test_labels_are_learnable_by_naive_bayes():
    """A unigram+bigram naive Bayes fitted on train scores above 60% on validation."""
    counts = {0: Counter(), 1: Counter()}
    for ex in sentiment_examples("train", 2000):
        counts[ex["label"]].update(_features(ex["text"]))
    vocab = counts[0].keys() | counts[1].keys()
    totals = {label: sum(c.values()) + len(vocab) for label, c in counts.items()}
    validation = sentiment_examples("validation", 1000)
    correct = 0
    for ex in validation:
        scores = {
            label: sum(
                math.log((counts[label][f] + 1) / totals[label])
                for f in _features(ex["text"])
                if f in vocab
            )
            for label in (0, 1)
        }
        correct += int(max(scores, key=scores.get) == ex["label"])
    assert correct / len(validation) > 0.6
