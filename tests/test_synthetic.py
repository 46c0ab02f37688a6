"""Tests for the synthetic dataset generators: sentiment and question answering."""

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

from tether.sources import SYNTHETIC_DATASETS
from tether.synthetic import GENERATORS, LABEL_NAMES, generate, qa_examples, sentiment_examples
from tether.synthetic.qa import (
    FACTS,
    HELDOUT_QUESTION_TEMPLATES,
    QUESTION_TEMPLATES,
    STATEMENT_TEMPLATES,
)

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


# --- question answering (synthetic/qa.py) ---------------------------------------------------

SPLITS = ("train", "validation")


def _template_regex(template: str, name: str | None = None, value: str = ".+?") -> re.Pattern:
    """``template`` as a regex: a literal ``name`` if given, else any; ``value`` a pattern."""
    pattern = re.escape(template.replace("|", "")).replace(re.escape("{art}"), "an?")
    pattern = pattern.replace(re.escape("{name}"), re.escape(name) if name else "(?P<name>.+?)")
    return re.compile(pattern.replace(re.escape("{value}"), f"(?P<value>{value})"))


def _parse_question(question: str, held_out: bool = False) -> tuple[str, str, str] | None:
    """(fact, template, subject name) of a question written from one of the templates."""
    templates = HELDOUT_QUESTION_TEMPLATES if held_out else QUESTION_TEMPLATES
    for fact, options in templates.items():
        for template in options:
            match = _template_regex(template).fullmatch(question)
            if match:
                return fact, template, match["name"]
    return None


def _any_template(question: str) -> tuple[str, str, str]:
    parsed = _parse_question(question) or _parse_question(question, held_out=True)
    assert parsed, question
    return parsed


def _sentences(context: str) -> list[tuple[int, str]]:
    """(offset, sentence) for each sentence of a context."""
    out, offset = [], 0
    for sentence in re.split(r"(?<=\.) ", context):
        out.append((offset, sentence))
        offset += len(sentence) + 1
    return out


def _states(sentence: str, fact: str, name: str) -> re.Match | None:
    """The match of ``sentence`` against a template stating ``fact`` about ``name``, if any
    (the one with the shortest value: "played the {value}." also matches "... in a band.")."""
    value = r"\d{4}" if fact == "birth_year" else ".+?"  # "born in 1871" vs "born in Tarsk"
    templates = STATEMENT_TEMPLATES[fact]
    matches = [_template_regex(t, name, value).fullmatch(sentence) for t in templates]
    return min(filter(None, matches), key=lambda m: len(m["value"]), default=None)


def test_qa_same_arguments_give_identical_output():
    """Calling twice with the same (split, n, seed, rate) returns identical lists."""
    for split in SPLITS:
        for rate in (0.0, 1 / 3):
            assert qa_examples(split, 200, 5, rate) == qa_examples(split, 200, 5, rate)
    assert qa_examples("train", 200, seed=0) != qa_examples("train", 200, seed=1)


def test_qa_output_does_not_depend_on_python_hash_seed():
    """Generation is identical across interpreters started with different PYTHONHASHSEED."""
    code = "import json; from tether.synthetic import qa_examples as q; "
    code += "print(json.dumps(q('validation', 200, 3, 1 / 3)))"
    outputs = []
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] == qa_examples("validation", 200, 3, 1 / 3)


@pytest.mark.parametrize("split", SPLITS)
def test_qa_examples_have_the_squad_layout(split):
    """Flat SQuAD rows with unique ids; train has one answer, validation one or two."""
    examples = qa_examples(split, 600)
    assert len({ex["id"] for ex in examples}) == 600
    counts = Counter()
    for ex in examples:
        assert set(ex) == {"id", "title", "context", "question", "answers"}
        assert ex["id"].startswith(f"qa-{split}-") and ex["title"] in ex["context"]
        assert set(ex["answers"]) == {"text", "answer_start"}
        assert len(ex["answers"]["text"]) == len(ex["answers"]["answer_start"])
        counts[len(ex["answers"]["text"])] += 1
        assert 4 <= len(_sentences(ex["context"])) <= 7
        assert 40 <= len(ex["context"].split()) <= 120
    assert set(counts) == ({1} if split == "train" else {1, 2}), counts


@pytest.mark.parametrize("split", SPLITS)
def test_qa_every_answer_slices_its_context_at_its_offset(split):
    """context[start : start + len(text)] == text for every gold answer, accents and CJK too."""
    examples = qa_examples(split, 1000, unanswerable_rate=1 / 3)
    non_ascii_answers = 0
    for ex in examples:
        for text, start in zip(ex["answers"]["text"], ex["answers"]["answer_start"]):
            assert ex["context"][start : start + len(text)] == text, ex
            assert 1 <= len(text.split()) <= 4, text
            non_ascii_answers += not text.isascii()
    assert sum(not ex["context"].isascii() for ex in examples) >= 300
    assert sum(bool(re.search("[\u4e00-\u9fff]", ex["context"])) for ex in examples) >= 50
    assert non_ascii_answers >= 50


@pytest.mark.parametrize("split", SPLITS)
def test_qa_answer_is_in_the_sentence_stating_the_asked_fact(split):
    """Each gold span lies in a sentence stating the asked fact about the asked person."""
    repeated = 0
    for ex in qa_examples(split, 1000):
        fact, _, name = _any_template(ex["question"])
        stating = [
            (offset, sentence)
            for offset, sentence in _sentences(ex["context"])
            if _states(sentence, fact, name)
        ]
        assert len(stating) == 1, ex  # the context states the fact exactly once
        offset, sentence = stating[0]
        value = _states(sentence, fact, name)["value"]
        assert ex["answers"]["text"][0] == value, ex
        for text, start in zip(ex["answers"]["text"], ex["answers"]["answer_start"]):
            assert offset <= start and start + len(text) <= offset + len(sentence), ex
        repeated += ex["context"].count(value) > 1
    assert repeated >= 3  # a town shared by two facts: the offset picks the asked one


def test_qa_validation_uses_held_out_question_phrasings():
    """About a third of validation questions use templates train never uses."""
    train_templates = {_any_template(ex["question"])[1] for ex in qa_examples("train", 3000)}
    validation = [_any_template(ex["question"])[1] for ex in qa_examples("validation", 600)]
    held_out = {t for options in HELDOUT_QUESTION_TEMPLATES.values() for t in options}
    assert train_templates == {t for options in QUESTION_TEMPLATES.values() for t in options}
    assert not held_out & train_templates
    assert set(validation) - train_templates == held_out
    assert 0.25 <= sum(t in held_out for t in validation) / len(validation) <= 0.42
    assert set(FACTS) == set(QUESTION_TEMPLATES) == set(HELDOUT_QUESTION_TEMPLATES)


def test_qa_validation_has_names_never_seen_in_train():
    """Validation contexts contain held-out names, places and organisations absent from train."""

    def words(examples: list[dict]) -> set[str]:
        return {w for ex in examples for w in re.findall(r"\w+", ex["context"] + ex["question"])}

    val_only = words(qa_examples("validation", 600)) - words(qa_examples("train", 3000))
    assert {"Kwame", "Astrid", "Żelazny", "Quorran", "Hålvik", "南浜", "Ambervale"} <= val_only


def test_qa_v2_has_the_requested_unanswerable_share():
    """qa-v2 makes a third of questions unanswerable with empty answer lists; qa makes none."""
    examples = generate("qa-v2", "validation", 600)
    unanswerable = [ex for ex in examples if not ex["answers"]["text"]]
    assert len(unanswerable) == 200
    absent = 0
    for ex in unanswerable:
        assert ex["answers"] == {"text": [], "answer_start": []}
        fact, _, name = _any_template(ex["question"])
        absent += name not in ex["context"]
        for _, sentence in _sentences(ex["context"]):
            assert not _states(sentence, fact, name), ex
    assert 30 <= absent <= 100  # some ask about a person who is not in the context
    assert all(ex["answers"]["text"] for ex in generate("qa", "validation", 600))
    assert qa_examples("train", 10, unanswerable_rate=1.0)[0]["answers"]["text"] == []


def test_qa_train_and_validation_share_no_example():
    """No (context, question) pair or id occurs in both splits."""
    train, validation = qa_examples("train", 3000), qa_examples("validation", 600)
    assert not {(e["context"], e["question"]) for e in train} & {
        (e["context"], e["question"]) for e in validation
    }
    assert not {e["id"] for e in train} & {e["id"] for e in validation}


def test_qa_bad_arguments_raise_value_error_naming_them():
    """An unknown split or a rate outside [0, 1] raises ValueError naming the bad value."""
    with pytest.raises(ValueError, match="test"):
        qa_examples("test", 10)
    with pytest.raises(ValueError, match="1.5"):
        qa_examples("train", 10, unanswerable_rate=1.5)


def test_qa_datasets_are_registered_with_their_columns():
    """synthetic:qa and synthetic:qa-v2 are question-answering sets whose rows hold the columns."""
    for name in ("qa", "qa-v2"):
        dataset = SYNTHETIC_DATASETS[name]
        assert dataset.task == "question-answering"
        row = GENERATORS[name]("train", 1, 0)[0]
        assert set(dataset.columns) <= set(row)


def test_sentiment_classes_are_named_without_label_names(packaged_model_dir):
    """synthetic:sentiment's labels are class ids with names (like a hub ClassLabel): a job
    that does not list label_names still predicts 'negative' / 'positive', not '0' / '1'."""
    from tether.config import validate_job
    from tether.models import load_tokenizer

    from .helpers import prepare

    spec = validate_job({"data": {"max_train_samples": 40, "max_validation_samples": 20}})
    task, _ = prepare(spec, load_tokenizer(str(packaged_model_dir)))
    assert task.labels == LABEL_NAMES
