"""Extractive question answering: SQuAD scoring, windows over long contexts, answer offsets
checked on load, SQuAD files, learning, and serving with offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tether.config import validate_job
from tether.errors import DataError
from tether.tasks.question_answering import QuestionAnswering, encode_windows, target_tokens
from tether.tasks.spans import best_answer, exact_match, normalize_answer, token_f1

from .helpers import write_rows

# (prediction, gold answers, exact match, F1), worked out by hand with the official SQuAD
# evaluation's rules: lower case, punctuation and a/an/the removed, best over the golds
SCORED = [
    ("the Eiffel Tower", ["Eiffel Tower"], 1.0, 1.0),
    ("Paris, France", ["Paris"], 0.0, 2 / 3),  # P 1/2, R 1
    ("in 1871", ["1871", "in 1871"], 1.0, 1.0),
    ("Denver Broncos", ["Broncos", "the Carolina Panthers"], 0.0, 2 / 3),
    ("the cat sat on the mat", ["cat on mat", "a dog"], 0.0, 6 / 7),  # P 3/4, R 1
    ("A. B.", ["a b"], 1.0, 1.0),  # both normalise to "b"
    ("Zoë Müller", ["zoë müller"], 1.0, 1.0),
    ("", ["Tarsk"], 0.0, 0.0),
    ("glass blower", ["glassblower"], 0.0, 0.0),
    ("1871 1871", ["1871"], 0.0, 2 / 3),  # a repeated token counts once against the gold
    # SQuAD v2.0: no gold answer means the right answer is nothing
    ("", [], 1.0, 1.0),
    ("Tarsk", [], 0.0, 0.0),
]


def test_exact_match_and_f1_follow_the_official_squad_evaluation():
    """Per pair and in total (v1.1 pairs: EM 40 %, F1 48/70)."""
    for prediction, gold, em, f1 in SCORED:
        assert exact_match(prediction, gold) == em, (prediction, gold)
        assert token_f1(prediction, gold) == pytest.approx(f1, abs=1e-12), (prediction, gold)
    v1 = SCORED[:10]
    assert sum(exact_match(p, g) for p, g, *_ in v1) / len(v1) == pytest.approx(0.4)
    assert sum(token_f1(p, g) for p, g, *_ in v1) / len(v1) == pytest.approx(48 / 70)
    assert normalize_answer("  The  Cat's, hat!") == "cats hat"


CONTEXT = (
    "Zoë Müller was born in Tarsk in 1871 and trained as a glassblower. "
    "Years later her brother Tomas moved to Łódź, where he opened a bakery near 青山 station "
    "and played the cello every Sunday."
)


@pytest.fixture(scope="module")
def tokenizer(packaged_model_dir):
    from tether.models import load_tokenizer

    return load_tokenizer(str(packaged_model_dir))


@pytest.mark.parametrize("answer", ["Łódź", "青山", "cello"])
def test_an_answer_in_a_later_window_is_found_and_its_offsets_slice_the_context(tokenizer, answer):
    """The context does not fit one window: the answer's window targets its tokens (the
    others point at CLS), and logits peaking there decode to offsets that slice the context
    back to the answer, accents and CJK included."""
    begin = CONTEXT.index(answer)
    windows = encode_windows(tokenizer, ["Where did Tomas go?"], [CONTEXT], 32, 8, 8)
    assert len(windows.input_ids) >= 3 and set(windows.example) == {0}
    targets = [
        target_tokens(s, e, ((begin, begin + len(answer)),))
        for s, e in zip(windows.char_start, windows.char_end)
    ]
    holding = [w for w, t in enumerate(targets) if t != (0, 0)]
    assert holding and holding[0] > 0, "the answer is not in the first window"
    logits = []
    for w, (s, e) in enumerate(targets):
        start, end = np.zeros(len(windows.input_ids[w])), np.zeros(len(windows.input_ids[w]))
        if w == holding[0]:
            start[s], end[e] = 9.0, 9.0
        logits.append((start, end, np.array(windows.char_start[w]), np.array(windows.char_end[w])))
    span, _ = best_answer(logits, max_answer_length=30, unanswerable=False)
    assert span.window == holding[0]
    assert CONTEXT[span.start : span.end] == answer
    # a model that prefers "no answer" answers nothing only when unanswerable is allowed
    for start, end, *_ in logits:
        start[0] = end[0] = 20.0
    assert best_answer(logits, 30, unanswerable=True)[0] is None
    assert CONTEXT[slice(*_span(best_answer(logits, 30, unanswerable=False)[0]))] == answer


def _span(span) -> tuple[int, int]:
    return span.start, span.end


def qa_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        answer = ["Tarsk", "1871", "Łódź", "青山"][i % 4]
        rows.append(
            {
                "id": f"q{i}",
                "question": "Where or when?",
                "context": CONTEXT,
                "answers": {"text": [answer], "answer_start": [CONTEXT.index(answer)]},
            }
        )
    return rows


def qa_job(train, validation, model, **data) -> dict:
    return {
        "model": {"name": str(model), "task": "question-answering"},
        "data": {"train": str(train), "validation": str(validation), "max_length": 64}
        | {"doc_stride": 16, "max_question_length": 16}
        | data,
        "scaling": {"num_workers": 2},
        "tracking": {"enabled": False},
    }


def test_bad_answer_offsets_are_named_before_any_ray_work(
    tmp_path, packaged_model_dir, monkeypatch
):
    """An answer that is not at its offset names the example id and what the context reads
    there, from the driver's data preparation (a training run fails before it would start
    Ray); data.skip_bad counts it."""
    import tether.run
    from tether.run import prepare_run_data, run_training

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the data was checked")

    monkeypatch.setattr(tether.run, "ensure_ray", no_ray)

    rows = qa_rows()
    rows[2]["answers"]["answer_start"] = [rows[2]["answers"]["answer_start"][0] + 1]
    train = write_rows(tmp_path / "train.jsonl", rows)
    val = write_rows(tmp_path / "val.jsonl", qa_rows())
    spec = validate_job(qa_job(train, val, packaged_model_dir))
    with pytest.raises(DataError, match=r"example q2 \(train.jsonl line 3\).*'Łódź'.*'ódź,'"):
        run_training(spec)
    spec = validate_job(qa_job(train, val, packaged_model_dir, skip_bad=True))
    _, data = prepare_run_data(spec)
    assert data.stats["train_skipped_bad_answers"] == 1
    assert data.stats["train_examples"] == 3 and data.stats["validation_examples"] == 4
    rows[0]["question"] = "  "  # skip_bad skips answers off their offset, nothing else
    write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"data.question_column: example q0"):
        prepare_run_data(spec)


def test_squad_files_load_in_both_versions(tmp_path, packaged_model_dir):
    """SQuAD v1.1 and v2.0 JSON as distributed (data → paragraphs → qas): rows in the hub
    layout, the spec's column check passes, and v2.0's unanswerable questions need
    data.unanswerable: true."""
    from tether.run import prepare_run_data

    def squad(version: str, impossible: bool) -> dict:
        qas = [
            {
                "id": f"{version}-{i}",
                "question": "Where was Zoë born?",
                "answers": [{"text": "Tarsk", "answer_start": CONTEXT.index("Tarsk")}],
            }
            for i in range(3)
        ]
        if impossible:
            qas.append(
                {
                    "id": "nope",
                    "question": "What did Zoë eat?",
                    "answers": [],
                    "plausible_answers": [{"text": "bakery", "answer_start": 5}],
                    "is_impossible": True,
                }
            )
        return {
            "version": version,
            "data": [{"title": "T", "paragraphs": [{"context": CONTEXT, "qas": qas}]}],
        }

    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(squad("1.1", False)))
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps(squad("v2.0", True)))
    from tether.data import load_rows

    rows = load_rows(str(v2), "train")
    assert [r["id"] for r in rows] == ["v2.0-0", "v2.0-1", "v2.0-2", "nope"]
    assert rows[0]["answers"] == {"text": ["Tarsk"], "answer_start": [CONTEXT.index("Tarsk")]}
    assert rows[3]["answers"] == {"text": [], "answer_start": []}
    assert "data[0].paragraphs[0].qas[3]" in rows[3]["__where__"]
    _, data = prepare_run_data(validate_job(qa_job(v1, v1, packaged_model_dir)))
    assert data.stats["train_examples"] == 3
    with pytest.raises(DataError, match="example nope .*data.unanswerable: true"):
        prepare_run_data(validate_job(qa_job(v2, v1, packaged_model_dir)))
    _, data = prepare_run_data(validate_job(qa_job(v2, v1, packaged_model_dir, unanswerable=True)))
    assert data.stats["train_unanswerable"] == 1


def test_window_settings_that_cannot_advance_are_refused(tokenizer):
    """In the spec (3 special tokens at least) and, with the tokenizer's own count, when
    encoding; a minimal QA job validates with stride and question length derived from
    max_length."""
    from tether.errors import SpecError

    with pytest.raises(SpecError, match=r"\n  - data\.doc_stride: a window"):
        validate_job(
            {
                "model": {"task": "question-answering"},
                "data": {"train": "synthetic:qa", "max_length": 64, "doc_stride": 48},
            }
        )
    with pytest.raises(DataError, match="data.doc_stride"):
        encode_windows(tokenizer, ["Where?"], [CONTEXT], 40, 20, 17)  # 17 + 20 + 3 = 40
    task = QuestionAnswering.from_spec(
        validate_job({"model": {"task": "question-answering"}, "data": {"train": "synthetic:qa"}})
    )
    assert (task.max_length, task.doc_stride, task.max_question_length) == (128, 32, 32)


def test_the_task_card_round_trips():
    """What serving rebuilds from the card is the task that trained."""
    task = QuestionAnswering(max_length=96, doc_stride=24, unanswerable=True, max_answer_length=12)
    again = QuestionAnswering.from_card(task.card())
    assert again.card() == task.card()


def served_f1(model_dir, card: dict, rows: list[dict], extra=()) -> tuple[float, list]:
    """Mean F1 of the serving predictor's answers to ``rows``, and its answers (to ``rows``
    and then to ``extra`` items)."""
    from tether.tasks import task_for_card
    from tether.tasks.qa_serving import QAItem

    predictor = task_for_card(card).predictor(model_dir, card, 4096)
    items = [QAItem(r["question"], r["context"]) for r in rows] + list(extra)
    answers = predictor.predict(items)
    for item, answer in zip(items, answers, strict=True):
        if answer.answer:
            assert item.context[answer.start : answer.end] == answer.answer
            assert 0 < answer.score <= 1
    f1 = sum(token_f1(a.answer, r["answers"]["text"]) for a, r in zip(answers, rows))
    return f1 / len(rows), answers


@pytest.mark.slow
def test_tiny_bert_learns_the_synthetic_qa_task_and_serves_its_answers(tiny_model_dir, tmp_path):
    """Held-out F1 rises well above the untrained model's in a short in-process run (a
    32-wide random BERT learns only part of the task; MiniLM's numbers are in
    docs/benchmarks.md); the exported model answers through the serving predictor with
    offsets that slice the context, also when the context needs several windows."""
    import torch

    from tether.run import run_training
    from tether.synthetic import generate
    from tether.tasks.qa_serving import QAItem
    from tether.train.checkpoint import checkpoints, read_state

    job = {
        "name": "qa",
        "model": {"name": str(tiny_model_dir), "task": "question-answering"},
        "data": {
            "train": "synthetic:qa",
            "max_train_samples": 2400,
            "max_validation_samples": 150,
            "max_length": 96,
            "doc_stride": 32,
            "max_question_length": 24,
        },
        "objective": {"lambda": 0.0},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
        "train": {"epochs": 4, "batch_size": 16, "eval_interval": 100, "keep_checkpoints": 20},
        "eval": {"max_answer_length": 8},
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "qa"},
    }
    spec = validate_job(job)
    task = QuestionAnswering.from_spec(spec)
    untrained = tmp_path / "untrained"  # the base with its fresh span head: the start
    torch.manual_seed(0)
    task.load_model(str(tiny_model_dir), None, False).model.save_pretrained(untrained)
    task.load_tokenizer(str(tiny_model_dir), None, False).save_pretrained(untrained)
    held_out = generate("qa", "validation", 60)
    start, _ = served_f1(untrained, task.card(), held_out)

    outcome = run_training(spec)
    curve = [read_state(c)["metrics"]["eval/f1"] for c in checkpoints(outcome.summary["run_dir"])]
    model_dir = outcome.summary["model_dir"]
    card = json.loads((__import__("pathlib").Path(model_dir) / "tether.json").read_text())
    assert card["task"] == "question-answering" and card["doc_stride"] == 32
    long_context = " ".join(r["context"] for r in held_out[:4])  # several windows
    question = QAItem(held_out[3]["question"], long_context)
    trained, answers = served_f1(model_dir, card, held_out, [question])
    print("f1: untrained", start, "served", trained, "eval curve", curve)
    assert outcome.summary["primary_metric"] == "eval/f1"
    assert trained > 3 * start and trained > start + 0.1
    assert curve[-1] > start + 0.1
    assert answers[-1].windows > 1 and answers[-1].answer


@pytest.mark.slow
def test_a_lora_qa_run_registers_and_its_champion_answers_through_pyfunc(
    tiny_model_dir, tmp_path, monkeypatch
):
    """LoRA and the registry work unchanged for QA: an adapter run (its span head trained in
    full) registers as champion, MLflow's pyfunc takes a question/context DataFrame and
    answers like the serving predictor on the exported folder, and the adapter served on the
    shared base (/v1/predict's adapter pool) answers like the merged export."""
    import mlflow
    import pandas as pd

    from tether.run import run_training
    from tether.synthetic import generate

    db = tmp_path / "mlflow.db"
    job = {
        "name": "qa-lora",
        "model": {
            "name": str(tiny_model_dir),
            "task": "question-answering",
            "adapter": {"r": 4, "alpha": 8},
        },
        "data": {
            "train": "synthetic:qa",
            "max_train_samples": 64,
            "max_validation_samples": 16,
            "max_length": 64,
            "doc_stride": 16,
            "max_question_length": 16,
        },
        "objective": {"lambda": 0.01},
        "optim": {"lr": 3e-3},
        "train": {"max_steps": 4, "batch_size": 8, "eval_interval": 2},
        "scaling": {"num_workers": 0},
        "tracking": {"uri": f"sqlite:///{db}", "registered_model": "qa"},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "qa-lora"},
    }
    outcome = run_training(validate_job(job), register=True)
    assert outcome.summary["registry"]["promoted"] is True
    model_dir = outcome.summary["model_dir"]
    card = json.loads((__import__("pathlib").Path(model_dir) / "tether.json").read_text())
    assert card["task"] == "question-answering" and card["objective"]["adapter"]["r"] == 4
    rows = generate("qa", "validation", 6)
    _, want = served_f1(model_dir, card, rows)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    model = mlflow.pyfunc.load_model("models:/qa@champion")
    frame = pd.DataFrame({"question": [r["question"] for r in rows]})
    frame["context"] = [r["context"] for r in rows]
    got = model.predict(frame)
    assert list(got.answer) == [a.answer for a in want]
    assert got["start"].tolist() == [a.start for a in want]

    import asyncio

    from tether.serving.adapters import AdapterSource, HeadAdapterPool
    from tether.tasks.qa_serving import QAItem

    pool = HeadAdapterPool("question-answering", tiny_model_dir, 4096)
    path = __import__("pathlib").Path(model_dir)
    loaded = asyncio.run(pool.load(AdapterSource("qa", folder=str(path)), path))
    shared = loaded.predictor.predict([QAItem(r["question"], r["context"]) for r in rows])
    assert [(a.answer, a.start) for a in shared] == [(a.answer, a.start) for a in want]
    assert [a.score for a in shared] == pytest.approx([a.score for a in want], abs=1e-5)


def test_a_long_question_is_cut_and_every_window_fits(tokenizer):
    """A question over max_question_length tokens is cut (and counted); every window holds
    at most max_length tokens and some context, and the windows cover the whole context."""
    question = "Which of the many towns named in this long and winding question " * 4
    windows = encode_windows(tokenizer, [question, "Where?"], [CONTEXT, CONTEXT], 40, 8, 12)
    assert windows.questions_cut == 1
    assert all(len(ids) <= 40 for ids in windows.input_ids)
    for example in (0, 1):
        rows = [w for w, e in enumerate(windows.example) if e == example]
        covered = set()
        for w in rows:
            starts = [c for c in windows.char_start[w] if c >= 0]
            assert starts, "a window without context"
            ends = [c for c in windows.char_end[w] if c >= 0]
            covered |= set(range(min(starts), max(ends)))
        assert covered >= {i for i, ch in enumerate(CONTEXT) if not ch.isspace()}


def test_questions_are_cut_to_at_most_the_limit_with_a_byte_level_tokenizer(tiny_llama_dir):
    """SmolLM2's byte-level BPE: a question cut at the end of token k may re-tokenize into
    more than k tokens; cut before token k+1 it never does. And a tokenizer without a CLS
    token is refused for QA, naming why, before any training."""
    from tether.models import load_tokenizer
    from tether.tasks.question_answering import cut_questions

    llama = load_tokenizer(str(tiny_llama_dir))
    questions = ["Wo liegt 青山駅 🚉 und wann fährt der Zug nach Łódź ab? 🙂🙂 " * 2]
    for k in (3, 5, 8, 11, 17):
        (cut, was_cut), *_ = cut_questions(llama, questions, k)
        assert was_cut and len(llama(cut, add_special_tokens=False)["input_ids"]) <= k
    task = QuestionAnswering(max_length=64, doc_stride=16, max_question_length=16)
    with pytest.raises(DataError, match="CLS token"):
        task.encode(qa_rows(2), llama, "train")


def test_left_padding_tokenizers_answer_the_same_alone_or_batched(tiny_model_dir, tmp_path):
    """The predictor pads right whatever the tokenizer's side, so an answer does not depend on
    what else shares its forward pass; contexts that need too many windows are refused."""
    from tether.tasks.predict import RequestTooLarge
    from tether.tasks.qa_serving import QAItem

    task = QuestionAnswering(max_length=48, doc_stride=12, max_question_length=16)
    torch = pytest.importorskip("torch")
    torch.manual_seed(5)
    task.load_model(str(tiny_model_dir), None, False).model.save_pretrained(tmp_path)
    tokenizer = task.load_tokenizer(str(tiny_model_dir), None, False)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)
    predictor = task.predictor(tmp_path, task.card(), 4096)
    assert predictor.tokenizer.padding_side == "left"
    short = QAItem("When?", "In 1871.")
    long = QAItem("Where was Zoë born?", CONTEXT)
    alone = predictor.predict([short])[0]
    together = predictor.predict([long, short])[1]
    assert (together.answer, together.start) == (alone.answer, alone.start)
    assert together.score == pytest.approx(alone.score, rel=1e-5)
    request = task.request_model(64, 20000)
    body = request.model_validate({"items": [{"question": "Where?", "context": CONTEXT * 40}] * 8})
    with pytest.raises(RequestTooLarge, match="windows"):
        predictor.items(body)
    fits = request.model_validate({"items": [{"question": "Where?", "context": CONTEXT}] * 8})
    assert len(predictor.items(fits)) == 8
    many = [QAItem("Where was Zoë born and when?", CONTEXT * k) for k in (1, 3, 7)]
    windows = encode_windows(
        predictor.tokenizer, *zip(*[(i.question, i.context) for i in many]), 48, 12, 16
    )
    assert predictor.count_windows(many) == len(windows.input_ids)  # counted as split


@pytest.mark.parametrize("answer", ["Paris ", " Paris", " Paris "])
def test_a_gold_answer_with_spaces_targets_only_its_own_tokens(tokenizer, answer):
    """Spaces around a gold answer hold no token: its targets are the tokens of "Paris",
    never the neighbouring "is", directly and through the task's encoding."""
    context = "The capital is Paris is lovely"
    begin = context.index(answer)
    windows = encode_windows(tokenizer, ["Where?"], [context], 64, 16, 16)
    s, e = target_tokens(
        windows.char_start[0], windows.char_end[0], ((begin, begin + len(answer)),)
    )
    assert tokenizer.convert_ids_to_tokens(windows.input_ids[0][s : e + 1]) == ["paris"]
    row = {"id": "q", "question": "Where?", "context": context}
    row["answers"] = {"text": [answer], "answer_start": [begin]}
    task = QuestionAnswering(max_length=64, doc_stride=16, max_question_length=16)
    encoded, _ = task.encode([row], tokenizer, "train")
    s, e = encoded.fields["start_positions"][0], encoded.fields["end_positions"][0]
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids.row(0)[s : e + 1]) == ["paris"]


def test_no_answer_accuracy_is_exact_match_on_the_unanswerable_questions(tokenizer):
    """An unanswerable question answered "the" (which normalises to "") is exact-matched, and
    so counts as answered right in eval/no_answer_accuracy, as in SQuAD v2.0's NoAns_exact."""
    import torch

    from tether.tasks.question_answering import NO_CHAR

    context = "Tarsk is the capital."
    row = {
        "id": "q",
        "question": "Who?",
        "context": context,
        "answers": {"text": [], "answer_start": []},
    }
    task = QuestionAnswering(
        max_length=64, doc_stride=16, max_question_length=16, unanswerable=True
    )
    encoded, _ = task.encode([row], tokenizer, "validation")
    batch = encoded.collate([0], tokenizer.pad_token_id)
    char_start = encoded.fields["char_start"].row(0).tolist()
    the = char_start.index(context.index("the"))  # the token of "the"
    assert char_start[the] != NO_CHAR

    class PointsAtThe(torch.nn.Module):
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            logits = torch.zeros(input_ids.shape)
            logits[:, the] = 9.0
            return type("Out", (), {"start_logits": logits, "end_logits": logits})()

    metrics = task.eval_metrics(task.eval_counts(PointsAtThe(), batch))
    assert metrics["eval/exact_match"] == 1.0
    assert metrics["eval/no_answer_accuracy"] == 1.0


def test_contexts_whose_characters_are_several_tokens_are_refused_by_their_window_count(
    tokenizer,
):
    """Hangul is 2-3 WordPiece tokens a character: a request is refused (naming its windows)
    by the windows its tokens need, not by a bound from its characters."""
    from tether.tasks.predict import RequestTooLarge
    from tether.tasks.qa_serving import AnswerPredictor, QAItem

    task = QuestionAnswering(max_length=48, doc_stride=12, max_question_length=16)
    predictor = AnswerPredictor.__new__(AnswerPredictor)  # counting needs no model
    predictor.task, predictor.tokenizer, predictor.max_length = task, tokenizer, 48
    korean = "한국어 문장입니다 " * 400  # 4,000 characters, 8,400 tokens
    item = QAItem("어디?", korean)
    windows = encode_windows(tokenizer, [item.question], [item.context], 48, 12, 16)
    assert predictor.count_windows([item]) == len(windows.input_ids) == 300
    request = task.request_model(64, 20000)
    one = request.model_validate({"question": item.question, "context": korean})
    with pytest.raises(RequestTooLarge, match=r"the context needs 300 windows of 48 tokens"):
        predictor.items(one)
    many = request.model_validate({"items": [{"question": "어디?", "context": korean}] * 8})
    with pytest.raises(RequestTooLarge, match=r"the first 1 of the 8 contexts already need 300"):
        predictor.items(many)


def test_a_window_that_starts_at_an_answer_holds_it_despite_a_leading_space(tokenizer):
    """An answer " her" whose word is a window's first context token is that window's target:
    the space before it, outside the window, is no part of the answer."""
    windows = encode_windows(tokenizer, ["Who?"], [CONTEXT], 32, 8, 8)
    w = next(
        w
        for w in range(1, len(windows.input_ids))
        if CONTEXT[min(c for c in windows.char_start[w] if c >= 0) - 1] == " "
    )
    first = windows.char_start[w].index(min(c for c in windows.char_start[w] if c >= 0))
    begin, finish = windows.char_start[w][first] - 1, windows.char_end[w][first]
    row = {"id": "q", "question": "Who?", "context": CONTEXT}
    row["answers"] = {"text": [CONTEXT[begin:finish]], "answer_start": [begin]}
    task = QuestionAnswering(max_length=32, doc_stride=8, max_question_length=8)
    encoded, _ = task.encode([row], tokenizer, "train")
    assert encoded.fields["start_positions"][w] == encoded.fields["end_positions"][w] == first
