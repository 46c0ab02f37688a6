"""Token classification (NER): entity scores equal seqeval's, sub-token alignment, CoNLL
files, entity offsets, learning, and exact metrics under data parallelism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tether.config import validate_job
from tether.errors import DataError
from tether.models import load_tokenizer
from tether.tasks.entities import count_entities, entity_types, f1
from tether.tasks.token_classification import TokenClassification

from .helpers import prepare, shared_data, write_rows

GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC"],  # an entity at the sentence end
    ["I-ORG", "I-ORG", "O", "I-PER", "I-PER"],  # IOB1: chunks start with I-
    ["O", "I-MISC", "B-MISC", "O"],  # IOB1 boundary between two chunks of one type
    ["B-LOC", "O", "O", "O"],
    ["S-PER", "O", "B-ORG", "E-ORG"],  # IOBES
]
PRED = [
    ["B-PER", "I-PER", "O", "B-LOC"],
    ["B-ORG", "I-ORG", "O", "B-PER", "O"],
    ["O", "I-MISC", "I-MISC", "O"],  # merges the two gold chunks
    ["I-LOC", "I-LOC", "O", "I-ORG"],  # ill-formed I- after O starts a chunk
    ["B-PER", "O", "B-ORG", "I-ORG"],
]


def test_entity_scores_from_additive_counts_equal_seqeval():
    """Micro P/R/F1 and per-type F1 from summed per-sentence counts equal seqeval's."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    types = entity_types({t for s in GOLD + PRED for t in s})
    counts = np.sum([count_entities(g, p, types) for g, p in zip(GOLD, PRED)], axis=0)
    per_type = counts.reshape(len(types), 3)
    precision, recall, score = f1(*per_type.sum(axis=0))
    assert score == pytest.approx(f1_score(GOLD, PRED), abs=1e-12)
    assert precision == pytest.approx(precision_score(GOLD, PRED), abs=1e-12)
    assert recall == pytest.approx(recall_score(GOLD, PRED), abs=1e-12)
    report = classification_report(GOLD, PRED, output_dict=True, zero_division=0)
    for t, row in zip(types, per_type):
        assert f1(*row)[2] == pytest.approx(report[t]["f1-score"], abs=1e-12), t


def test_task_metrics_equal_seqeval_through_eval_counts():
    """The task's eval_counts/eval_metrics (what the loop all-reduces) agree with seqeval,
    including words cut by truncation, which count as predicted O."""
    from seqeval.metrics import f1_score

    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER", "B-MISC", "I-MISC"]
    task = TokenClassification().with_labels(labels)
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O", "B-MISC"]]  # the 4th word of s2 was cut
    index = {t: i for i, t in enumerate(labels)}

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.full((2, 5, len(labels)), -9.0)
            for row, tags in enumerate(pred):
                for position, tag in enumerate(tags):
                    logits[row, position, index[tag]] = 9.0
            return type("Out", (), {"logits": logits})()

    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.tensor(
            [[index[t] for t in gold[0]] + [-100], [index[t] for t in gold[1][:3]] + [-100, -100]]
        ),
        "word_starts": torch.tensor([[0, 1, 2, 3], [0, 1, 2, -1]]),
        "word_tags": torch.tensor([[index[t] for t in gold[0]], [index[t] for t in gold[1]]]),
    }
    metrics = task.eval_metrics(task.eval_counts(Fixed(), batch))
    padded_pred = [pred[0], pred[1] + ["O"]]
    assert metrics["eval/entity_f1"] == pytest.approx(f1_score(gold, padded_pred), abs=1e-12)
    assert metrics["eval/token_accuracy"] == pytest.approx(6 / 8)
    assert metrics["eval/num_examples"] == 2


def test_each_word_gets_exactly_one_labelled_subtoken(packaged_model_dir, tmp_path):
    """Words split into several sub-tokens carry their tag on the first one only."""
    tokenizer = load_tokenizer(str(packaged_model_dir))
    rows = [
        {
            "tokens": ["Unbelievably", "Schwarzenegger", "visited", "Reykjavik"],
            "ner_tags": ["O", "B-PER", "O", "B-LOC"],
        },
        {"tokens": ["EU", "rejects", "German", "call"], "ner_tags": ["B-ORG", "O", "B-MISC", "O"]},
    ] * 3
    path = write_rows(tmp_path / "t.jsonl", rows)
    spec = validate_job(
        {
            "model": {"task": "token-classification"},
            "data": {"train": str(path), "validation": str(path)},
        }
    )
    task, data = prepare(spec, tokenizer)
    assert task.labels == ("O", "B-LOC", "B-MISC", "B-ORG", "B-PER")
    labels = data.validation.fields["labels"]
    starts = data.validation.fields["word_starts"]
    for i in range(2):
        enc = tokenizer(rows[i]["tokens"], is_split_into_words=True)
        word_ids = enc.word_ids()
        if i == 0:
            assert len(word_ids) > len(rows[i]["tokens"]) + 2, "the test needs words that split"
        row = labels.row(i)
        labelled = [p for p in range(len(row)) if row[p] != -100]
        assert len(labelled) == len(rows[i]["tokens"])
        assert labelled == [word_ids.index(w) for w in range(len(rows[i]["tokens"]))]
        assert starts.row(i).tolist() == labelled
        assert [task.labels[row[p]] for p in labelled] == rows[i]["ner_tags"]


def test_a_word_the_tokenizer_drops_is_counted(packaged_model_dir, tmp_path):
    """A word with no token at all (a lone zero-width space: BERT's tokenizer drops it) keeps
    its gold tag and is scored as an "O" prediction; data_stats says how many there are."""
    tokenizer = load_tokenizer(str(packaged_model_dir))
    rows = [{"tokens": ["Anna", "\u200b", "Berlin"], "ner_tags": ["B-PER", "O", "B-LOC"]}] * 3
    path = write_rows(tmp_path / "z.jsonl", rows)
    spec = validate_job(
        {
            "model": {"task": "token-classification"},
            "data": {"train": str(path), "validation": str(path)},
        }
    )
    task, data = prepare(spec, tokenizer)
    assert data.stats["validation_words_without_a_token"] == 3
    assert data.validation.fields["word_starts"].row(0).tolist()[1] == -1
    gold = [task.labels[t] for t in data.validation.fields["word_tags"].row(0).tolist()]
    assert gold == ["B-PER", "O", "B-LOC"]  # all three kept


def test_conll_files_load_and_a_malformed_line_is_named_before_any_ray_work(tmp_path):
    """The original CoNLL format (4 columns, -DOCSTART-) loads; a line without a tag fails
    naming file and line, at spec validation time of the data."""
    from tether.run import prepare_run_data

    good = tmp_path / "train.txt"
    good.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\n"
        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n\n"
    )
    from tether.data import load_rows

    rows = load_rows(str(good), "train")
    assert [r["tokens"] for r in rows] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert rows[1]["ner_tags"] == ["I-PER", "I-PER"]
    bad = tmp_path / "bad.txt"
    bad.write_text("EU B-ORG\nrejects\nGerman B-MISC\n")
    spec = validate_job(
        {
            "model": {"task": "token-classification", "name": "packaged:all-MiniLM-L6-v2"},
            "data": {"train": str(bad)},
        }
    )
    with pytest.raises(DataError, match=r"bad.txt line 2: expected 'TOKEN ... TAG'"):
        prepare_run_data(spec)


def test_tags_that_are_not_iob_are_named(tmp_path, packaged_model_dir):
    """A tag outside O/B-/I-/E-/S- fails naming it."""
    rows = [{"tokens": ["a", "b"], "ner_tags": ["O", "PERSON"]}] * 4
    path = write_rows(tmp_path / "x.jsonl", rows)
    spec = validate_job({"model": {"task": "token-classification"}, "data": {"train": str(path)}})
    with pytest.raises(DataError, match="PERSON"):
        prepare(spec, load_tokenizer(str(packaged_model_dir)))


def test_served_entity_offsets_slice_the_original_text_with_accents_and_cjk():
    """Raw text: offsets index the original string, whatever its script."""
    from tether.tasks.token_serving import EntityPredictor, sentence_from_text, sentence_from_words

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    predictor = EntityPredictor.__new__(EntityPredictor)
    predictor.labels = labels
    text = "  José Müller-Ñúñez visited 東京, then São Paulo."
    sentence = sentence_from_text(text)
    tags = {
        "José": "B-PER",
        "Müller": "I-PER",
        "-": "I-PER",
        "Ñúñez": "I-PER",
        "東京": "B-LOC",
        "São": "B-LOC",
        "Paulo": "I-LOC",
    }
    probs = torch.zeros(len(sentence.words), len(labels))
    for i, w in enumerate(sentence.words):
        probs[i, labels.index(tags.get(w, "O"))] = 1.0
    found = predictor._entities(sentence, list(range(len(sentence.words))), probs, False).entities
    assert [(e.type, e.text) for e in found] == [
        ("PER", "José Müller-Ñúñez"),
        ("LOC", "東京"),
        ("LOC", "São Paulo"),
    ]
    assert all(text[e.start : e.end] == e.text for e in found)
    words = sentence_from_words(["Anna", "in", "Paris"])
    assert words.text == "Anna in Paris" and words.spans[2] == (8, 13)


def test_served_words_keep_their_combining_marks():
    """Raw text is split at spaces and punctuation, never at a combining mark: NFD accents and
    Devanagari vowel signs stay in their word, and entity offsets still slice the text."""
    from tether.tasks.token_serving import EntityPredictor, sentence_from_text

    hindi, bhasha = "हिन्दी", "भाषा"  # 6 and 4 code points, 3 and 2 of them marks
    text = f"Jose\u0301 Garci\u0301a ({hindi} {bhasha})"  # NFD: e + combining acute
    sentence = sentence_from_text(text)
    assert sentence.words == ["Jose\u0301", "Garci\u0301a", "(", hindi, bhasha, ")"]
    assert [text[a:b] for a, b in sentence.spans] == sentence.words
    labels = ["O", "B-PER", "I-PER", "B-MISC", "I-MISC"]
    predictor = EntityPredictor.__new__(EntityPredictor)
    predictor.labels = labels
    tags = ["B-PER", "I-PER", "O", "B-MISC", "I-MISC", "O"]
    probs = torch.nn.functional.one_hot(torch.tensor([labels.index(t) for t in tags]), 5)
    found = predictor._entities(sentence, list(range(6)), probs.float(), False).entities
    assert [(e.type, e.text) for e in found] == [
        ("PER", "Jose\u0301 Garci\u0301a"),
        ("MISC", f"{hindi} {bhasha}"),
    ]
    assert all(text[e.start : e.end] == e.text for e in found)


def test_a_word_without_a_token_is_predicted_outside_when_no_label_is_O():
    """With no "O" label, a word with no token is still scored as seqeval's "O" (no entity),
    not as label 0 (here B-PER, which would invent an entity)."""
    from seqeval.metrics import f1_score, precision_score

    labels = ["B-PER", "I-PER"]
    task = TokenClassification().with_labels(labels)
    gold = [["B-PER", "I-PER"], ["B-PER"]]  # the 2nd word of sentence 1 has no token

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.full((2, 2, len(labels)), -9.0)
            logits[:, 0, 0] = 9.0  # B-PER at each first word
            return type("Out", (), {"logits": logits})()

    batch = {
        "input_ids": torch.zeros(2, 2, dtype=torch.long),
        "attention_mask": torch.ones(2, 2, dtype=torch.long),
        "labels": torch.tensor([[0, -100], [0, -100]]),
        "word_starts": torch.tensor([[0, -1], [0, -1]]),
        "word_tags": torch.tensor([[0, 1], [0, -100]]),
    }
    metrics = task.eval_metrics(task.eval_counts(Fixed(), batch))
    pred = [["B-PER", "O"], ["B-PER"]]
    assert metrics["eval/entity_precision"] == pytest.approx(precision_score(gold, pred))
    assert metrics["eval/entity_f1"] == pytest.approx(f1_score(gold, pred))  # 0.5
    assert metrics["eval/token_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_tiny_bert_learns_the_synthetic_entity_task(tiny_model_dir, tmp_path):
    """Entity F1 rises from ~0 to well above it in a short in-process run."""
    from tether.run import run_training

    job = {
        "name": "ner",
        "model": {"name": str(tiny_model_dir), "task": "token-classification"},
        "data": {
            "train": "synthetic:entities",
            "max_train_samples": 800,
            "max_validation_samples": 200,
            "max_length": 48,
        },
        "objective": {"lambda": 0.0},
        "optim": {"lr": 5e-3, "warmup_ratio": 0.0},
        "train": {"epochs": 4, "batch_size": 16, "eval_interval": 25, "keep_checkpoints": 20},
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "ner"},
    }
    outcome = run_training(validate_job(job))
    from tether.train.checkpoint import checkpoints, read_state

    curve = [
        read_state(c)["metrics"]["eval/entity_f1"] for c in checkpoints(outcome.summary["run_dir"])
    ]
    assert curve[0] < 0.1
    assert outcome.summary["metrics"]["eval/entity_f1"] > 0.35
    assert outcome.summary["primary_metric"] == "eval/entity_f1"
    card = __import__("json").loads(
        (__import__("pathlib").Path(outcome.summary["model_dir"]) / "tether.json").read_text()
    )
    assert card["task"] == "token-classification" and card["label_names"][0] == "O"


def test_conll2003_dev_file_loads_when_present(packaged_model_dir):
    """The shared CoNLL-2003 dev split loads: 3,250 sentences, IOB2 tags over 4 types."""
    dev = shared_data("conll2003", "dev.txt")
    from tether.data import load_rows

    rows = load_rows(str(dev), "validation")
    assert len(rows) == 3250
    assert entity_types({t for r in rows for t in r["ner_tags"]}) == ["LOC", "MISC", "ORG", "PER"]


def test_csv_json_and_parquet_files_encode_like_jsonl(tmp_path, packaged_model_dir):
    """The same sentences as JSONL, JSON, parquet and CSV (a JSON list of words, a
    pandas-written list of tags, and space-separated cells) give identical arrays."""
    import json

    import pandas as pd

    rows = [
        {"tokens": ["EU", "rejects", "German", "call"], "ner_tags": ["B-ORG", "O", "B-MISC", "O"]},
        {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]},
    ] * 3
    tokenizer = load_tokenizer(str(packaged_model_dir))
    jsonl = write_rows(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    as_text = pd.DataFrame(
        {
            "tokens": [
                json.dumps(r["tokens"]) if i % 2 else " ".join(r["tokens"])
                for i, r in enumerate(rows)
            ],
            "ner_tags": [str(r["ner_tags"]) for r in rows],  # ['B-ORG', 'O', ...]
        }
    )
    as_text.to_csv(tmp_path / "t.csv", index=False)

    def encoded(path):
        spec = validate_job(
            {
                "model": {"task": "token-classification"},
                "data": {"train": str(path), "validation": str(path)},
            }
        )
        task, data = prepare(spec, tokenizer)
        return task.labels, [data.validation.fields["labels"].row(i).tolist() for i in range(6)]

    want = encoded(jsonl)
    for name in ("t.json", "t.parquet", "t.csv"):
        assert encoded(tmp_path / name) == want, name


def test_the_progress_line_shows_what_the_task_reports():
    """Every headline metric the task reported, primary first; no per-type breakdowns or
    counts (the line is not written for one task)."""
    from tether.train.loop import progress_line

    m = {
        "step": 10,
        "total_steps": 20,
        "epoch": 0.5,
        "train/fine_loss": 0.5,
        "train/anchor_loss": 0.0,
        "train/samples_per_s": 12.0,
        "eval/loss": 0.4,
        "eval/entity_f1": 0.8,
        "eval/precision": 0.7,
        "eval/f1/PER": 0.9,
        "eval/num_examples": 50.0,
        "eval/target_tokens": 300.0,
    }
    line = progress_line(m, "eval/entity_f1")
    assert line.index("entity_f1 0.8000") < line.index("loss 0.4000")
    assert "precision 0.7000" in line and "PER" not in line
    assert "num_examples" not in line and "target_tokens" not in line
