"""Extractive question answering (SQuAD): point at the answer's span in the context.

Data: one row per question, {question, context, answers: {text: [...], answer_start: [...]}}
(the hub layout; SQuAD v1.1/v2.0 JSON files are read into it). Every answer is checked
against its context on the driver: ``context[answer_start:][:len(text)]`` must be the text,
else the example's id is named (or, with ``data.skip_bad``, it is counted and dropped).

Encoding: the question (cut to ``max_question_length`` tokens) and the context as a pair; a
context longer than one window is split into overlapping windows (``doc_stride`` tokens
shared), each window a row. A window's target is the first and last token that the first
gold answer (spaces around it stripped) overlaps, when the window holds all of it, else the
CLS token (position 0), as for unanswerable questions. Loss unit: the window (mean of the
start and end cross-entropies).

Evaluation: the windows of one example are always scored together, on one rank and in one
batch (``Encoded.group_field``), so the best span over all of them is found where the example
is counted; exact match and F1 per example (official SQuAD normalisation, best over the gold
answers, ``tether.tasks.spans``) are then additive sums, exact under data parallelism.
Primary metric ``eval/f1``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tether.data import DataError, Encoded, Ragged, where
from tether.data.batching import group_rows
from tether.tasks import ValidationOnly, model_inputs
from tether.tasks.spans import NULL_POSITION, best_answer, exact_match, token_f1

NO_CHAR = -1  # a token that is not part of the context (question, special, padding)


class AnswerOffsetError(DataError):
    """An answer that is not where its offset says (what ``data.skip_bad`` skips)."""


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[tuple[int, int], ...]  # gold (start, end) character spans; () unanswerable


@dataclass(frozen=True)
class QuestionAnswering(ValidationOnly):
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    id_column: str = "id"
    max_length: int = 384
    doc_stride: int = 128
    max_question_length: int = 64
    unanswerable: bool = False
    skip_bad: bool = False
    max_answer_length: int = 30
    null_score_threshold: float = 0.0
    labels: tuple[str, ...] = ()

    name = "question-answering"
    primary_metric = "eval/f1"
    example_labels = ()  # no label set: the answer is a span
    mode = "max"
    label_column = None

    @classmethod
    def from_spec(cls, spec) -> QuestionAnswering:
        from tether.config import qa_question_length, qa_stride

        d, e = spec.data, spec.eval
        return cls(
            question_column=d.question_column,
            context_column=d.context_column,
            answers_column=d.answers_column,
            id_column=d.id_column,
            max_length=d.max_length,
            doc_stride=qa_stride(d),
            max_question_length=qa_question_length(d),
            unanswerable=d.unanswerable,
            skip_bad=d.skip_bad,
            max_answer_length=e.max_answer_length,
            null_score_threshold=e.null_score_threshold,
        )

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> QuestionAnswering:
        return cls(
            max_length=int(card.get("max_length") or 384),
            doc_stride=int(card.get("doc_stride") or 128),
            max_question_length=int(card.get("max_question_length") or 64),
            unanswerable=bool(card.get("unanswerable", False)),
            max_answer_length=int(card.get("max_answer_length") or 30),
            null_score_threshold=float(card.get("null_score_threshold") or 0.0),
        )

    def with_labels(self, labels) -> QuestionAnswering:
        return self  # spans have no label set

    def cache_key(self) -> dict[str, Any]:
        decoding = ("max_answer_length", "null_score_threshold", "labels")  # not the encoding
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k not in decoding}
        return {"name": self.name} | kept

    def num_counts(self) -> int:
        return 10

    # ------------------------------------------------------------------- data (driver)

    def label_names(self, rows, declared, hub_names) -> list[str]:
        return []

    def example(self, row: dict) -> QAExample:
        """One row, checked: text fields present, every answer at its offset."""
        ident = row.get(self.id_column)
        ident = where(row) if ident is None or ident == "" else str(ident)
        question, context = row.get(self.question_column), row.get(self.context_column)
        for key, column, value in (
            ("question_column", self.question_column, question),
            ("context_column", self.context_column, context),
        ):
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"data.{key}: example {ident} ({where(row)}) column {column!r} must be "
                    f"non-blank text (got {value!r:.60})"
                )
        texts, starts = self._answer_lists(row, ident)
        spans = []
        for text, start in zip(texts, starts, strict=True):
            if not isinstance(text, str) or not text or not _is_offset(start):
                raise DataError(
                    f"data.answers_column: example {ident} ({where(row)}) has answer "
                    f"{text!r:.60} at {start!r}: expected non-empty text at an integer offset"
                )
            start = int(start)
            found = context[start : start + len(text)] if 0 <= start <= len(context) else ""
            if found != text:
                raise AnswerOffsetError(
                    f"data.answers_column: example {ident} ({where(row)}): answer {text!r:.60} "
                    f"is not at answer_start {start} of its context, which reads {found!r:.60} "
                    "there (set data.skip_bad: true to count and skip such examples)"
                )
            spans.append((start, start + len(text)))
        if not spans and not self.unanswerable:
            raise DataError(
                f"data.answers_column: example {ident} ({where(row)}) has no answer; for "
                "questions that may have none (SQuAD v2.0) set data.unanswerable: true"
            )
        return QAExample(ident, question, context, tuple(spans))

    def _answer_lists(self, row: dict, ident: str) -> tuple[list, list]:
        answers = row.get(self.answers_column)
        if isinstance(answers, str):  # a CSV cell: the JSON of the answers
            try:
                answers = json.loads(answers)
            except json.JSONDecodeError:
                pass
        if isinstance(answers, list):  # [{"text", "answer_start"}, ...] (SQuAD's own layout)
            if all(isinstance(a, dict) for a in answers):
                answers = {
                    "text": [a.get("text") for a in answers],
                    "answer_start": [a.get("answer_start") for a in answers],
                }
        if isinstance(answers, dict):
            texts, starts = answers.get("text"), answers.get("answer_start")
            texts = texts.tolist() if isinstance(texts, np.ndarray) else texts
            starts = starts.tolist() if isinstance(starts, np.ndarray) else starts
            if isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts):
                return texts, starts
        raise DataError(
            f"data.answers_column: example {ident} ({where(row)}) column "
            f"{self.answers_column!r} must be {{text: [...], answer_start: [...]}} of equal "
            f"length (got {answers!r:.80})"
        )

    def examples(self, rows: list[dict]) -> tuple[list[QAExample], int]:
        """Checked examples and how many were skipped for an answer that is not at its offset
        (only with ``skip_bad``; any other bad value still fails)."""
        out, bad = [], 0
        for row in rows:
            try:
                out.append(self.example(row))
            except AnswerOffsetError:
                if not self.skip_bad:
                    raise
                bad += 1
        return out, bad

    def encode(self, rows, tokenizer, split):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("question-answering needs a fast tokenizer (for character offsets)")
        examples, bad = self.examples(rows)
        if tokenizer.cls_token_id is None:
            raise DataError(
                "question-answering needs an encoder whose tokenizer starts each window with a "
                "CLS token (BERT, RoBERTa, ...): windows without the answer point at it"
            )
        windows = encode_windows(
            tokenizer,
            [e.question for e in examples],
            [e.context for e in examples],
            self.max_length,
            self.doc_stride,
            self.max_question_length,
        )
        starts, ends = [], []
        for w, example in enumerate(windows.example):
            ex = examples[example]  # training targets the first gold answer, spaces stripped
            first = tuple(content_span(ex.context, *span) for span in ex.answers[:1])
            s, e = target_tokens(windows.char_start[w], windows.char_end[w], first)
            starts.append(s)
            ends.append(e)
        fields: dict[str, Any] = {
            "start_positions": np.array(starts, dtype=np.int32),
            "end_positions": np.array(ends, dtype=np.int32),
            "example": np.array(windows.example, dtype=np.int64),
            "char_start": Ragged.from_rows(windows.char_start, np.int32),
            "char_end": Ragged.from_rows(windows.char_end, np.int32),
        }
        token_fields = ("char_start", "char_end")
        if windows.token_type_ids is not None:
            fields["token_type_ids"] = Ragged.from_rows(windows.token_type_ids, np.int8)
            token_fields += ("token_type_ids",)
        if split != "train":  # what scoring needs: each example's context and gold spans,
            # kept on its first window only (the others are scored in the same batch)
            fields |= gold_fields(examples, windows.example)
        encoded = Encoded(
            Ragged.from_rows(windows.input_ids, np.int32),
            fields,
            token_fields,
            pad_values={"char_start": NO_CHAR, "char_end": NO_CHAR},
            group_field="example",
        )
        per_example = np.bincount(windows.example) if windows.example else np.zeros(1, int)
        stats = {
            "examples": len(examples),
            "windows": len(windows.input_ids),
            "split_contexts": int(np.sum(per_example > 1)),
            # one example's windows are evaluated in one forward pass, whatever the batch size
            "most_windows": int(per_example.max()),
            "questions_cut": windows.questions_cut,
            "skipped_bad_answers": bad,
            "unanswerable": sum(not e.answers for e in examples),
        }
        return encoded, stats

    # ------------------------------------------------------------------- model (workers)

    def load_tokenizer(self, source, revision, trust_remote_code):
        from tether.models import load_tokenizer

        return load_tokenizer(source, revision, trust_remote_code)

    def load_model(self, source, revision, trust_remote_code):
        from transformers import AutoModelForQuestionAnswering

        from tether.models import load_pretrained

        return load_pretrained(source, AutoModelForQuestionAnswering, revision, trust_remote_code)

    def loss(self, model, batch):
        start, end = span_logits(model, batch)
        return window_loss(start, end, batch), torch.tensor(
            float(len(start)), dtype=torch.float64, device=start.device
        )

    # ------------------------------------------------------------------- evaluation

    def eval_counts(self, model, batch) -> torch.Tensor:
        """Summed exact match, F1 and examples; the same over answerable examples; no-answer
        examples answered with nothing, and their number; the summed loss and the windows."""
        start, end = span_logits(model, batch)
        host = {k: v.cpu().numpy() for k, v in batch.items() if k != "input_ids"}
        host["start"], host["end"] = start.cpu().numpy(), end.cpu().numpy()
        counts = np.zeros(self.num_counts())
        for rows in group_rows(host["example"]):
            prediction, gold = self._predict(host, rows)
            em, f1 = exact_match(prediction, gold), token_f1(prediction, gold)
            counts[0:3] += (em, f1, 1)
            if gold:
                counts[3:6] += (em, f1, 1)
            else:
                # exact match against the empty gold, as SQuAD v2.0's NoAns_exact: "the"
                # normalises to "" and is right, as exact match already counts it
                counts[6:8] += (em, 1)
        counts[8:10] = (float(window_loss(start, end, batch)), len(start))
        return torch.tensor(counts, dtype=torch.float64)

    def _predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> tuple[str, list[str]]:
        """The predicted answer text of one example (its windows are ``rows`` of the batch,
        on the host) and its gold answers' texts."""
        windows = []
        for r in rows:
            n = int(batch["attention_mask"][r].sum())
            windows.append(
                (batch["start"][r, :n], batch["end"][r, :n])
                + (batch["char_start"][r, :n], batch["char_end"][r, :n])
            )
        span, _ = best_answer(
            windows, self.max_answer_length, self.unanswerable, self.null_score_threshold
        )
        first = rows[0]
        if batch["context_length"][first] == 0:  # its first window holds the gold data
            raise ValueError("question-answering: an example's first window is not in its batch")
        context = "".join(map(chr, batch["context"][first, : batch["context_length"][first]]))
        spans = batch["answers"][first, : 2 * batch["num_answers"][first]].tolist()
        gold = [context[spans[i] : spans[i + 1]] for i in range(0, len(spans), 2)]
        return ("" if span is None else context[span.start : span.end]), gold

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        em, f1, n, has_em, has_f1, has_n, no_right, no_n, loss_sum, windows = counts.tolist()
        metrics = {
            "eval/f1": f1 / n if n else 0.0,
            "eval/exact_match": em / n if n else 0.0,
            "eval/loss": loss_sum / windows if windows else 0.0,
            "eval/num_examples": n,
        }
        if self.unanswerable:
            metrics |= {
                "eval/has_answer_f1": has_f1 / has_n if has_n else 0.0,
                "eval/has_answer_exact_match": has_em / has_n if has_n else 0.0,
                "eval/no_answer_accuracy": no_right / no_n if no_n else 0.0,
            }
        return metrics

    # ------------------------------------------------------------------- export

    def card(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "label_names": [],
            "max_length": self.max_length,
            "doc_stride": self.doc_stride,
            "max_question_length": self.max_question_length,
            "unanswerable": self.unanswerable,
            "max_answer_length": self.max_answer_length,
            "null_score_threshold": self.null_score_threshold,
        }

    def request_model(self, max_items: int, max_chars: int):
        from tether.tasks.qa_serving import qa_request_model

        return qa_request_model(max_items, max_chars)

    def request_example(self) -> dict[str, Any]:
        from tether.tasks.qa_serving import EXAMPLE

        return EXAMPLE

    def prediction_model(self):
        from tether.tasks.qa_serving import AnswerPrediction

        return AnswerPrediction

    def predictor(self, model_dir, card, max_batch_tokens: int, quantize: bool = False):
        from tether.tasks.qa_serving import AnswerPredictor

        return AnswerPredictor(self, model_dir, card, max_batch_tokens, quantize)


# --------------------------------------------------------------------------- windows


@dataclass
class Windows:
    """A batch of (question, context) pairs as windows: one row per window."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    example: list[int]  # the pair each window belongs to
    char_start: list[list[int]]  # per token: its first context character, or NO_CHAR
    char_end: list[list[int]]  # per token: one past its last context character, or NO_CHAR
    questions_cut: int


def cut_questions(tokenizer, questions: list[str], max_tokens: int) -> list[tuple[str, bool]]:
    """Each question's first ``max_tokens`` tokens, as text, and whether it was cut (one
    batched tokenizer call)."""
    if not questions:
        return []
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, offsets in zip(questions, enc["offset_mapping"], strict=True):
        cut = len(offsets) > max_tokens
        # up to where token k+1 starts: a byte-level BPE may re-tokenize text cut at the end
        # of token k into more than k tokens, never text cut before the next one begins
        out.append((question[: offsets[max_tokens][0]] if cut else question, cut))
    return out


def encode_windows(
    tokenizer,
    questions: list[str],
    contexts: list[str],
    max_length: int,
    doc_stride: int,
    max_question_length: int,
) -> Windows:
    """Tokenize pairs into windows of at most ``max_length`` tokens, ``doc_stride`` tokens of
    context shared by neighbours, with each token's character span in its context."""
    if not questions:
        return Windows([], None, [], [], [], 0)
    from tether.config import check_windows

    try:  # the tokenizer's own special tokens (RoBERTa's pairs take 4, BERT's 3)
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        check_windows(max_length, doc_stride, max_question_length, specials)
    except ValueError as e:
        raise DataError(str(e)) from None
    cut = cut_questions(tokenizer, questions, max_question_length)
    enc = tokenizer(
        [q for q, _ in cut],
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids="token_type_ids" in tokenizer.model_input_names,
        return_attention_mask=False,
    )
    char_start, char_end = [], []
    for w, offsets in enumerate(enc["offset_mapping"]):
        context = [s == 1 for s in enc.sequence_ids(w)]  # 0: question, None: special
        char_start.append([o[0] if c else NO_CHAR for o, c in zip(offsets, context, strict=True)])
        char_end.append([o[1] if c else NO_CHAR for o, c in zip(offsets, context, strict=True)])
    return Windows(
        enc["input_ids"],
        enc.get("token_type_ids"),
        list(enc["overflow_to_sample_mapping"]),
        char_start,
        char_end,
        sum(was_cut for _, was_cut in cut),
    )


def target_tokens(
    char_start: list[int], char_end: list[int], answers: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The first and last token of the answer when this window holds all of it, else the
    CLS position for both (no answer here)."""
    if not answers:
        return NULL_POSITION, NULL_POSITION
    begin, finish = answers[0]
    tokens = [t for t, c in enumerate(char_start) if c != NO_CHAR]
    if not tokens or begin < char_start[tokens[0]] or finish > char_end[tokens[-1]]:
        return NULL_POSITION, NULL_POSITION
    # the tokens the span overlaps: a gold answer "Paris " ends in a space no token holds, and
    # the first token ending at or after it would be the next word's
    inside = [t for t in tokens if char_end[t] > begin and char_start[t] < finish]
    if not inside:  # only characters no token holds (spaces): nothing to point at
        return NULL_POSITION, NULL_POSITION
    return inside[0], inside[-1]


def content_span(context: str, begin: int, finish: int) -> tuple[int, int]:
    """``context[begin:finish]`` without its leading and trailing whitespace, as offsets (a
    window that starts at "Paris" holds all of the answer " Paris")."""
    text = context[begin:finish]
    lead = len(text) - len(text.lstrip())
    return begin + lead, max(begin + lead, finish - (len(text) - len(text.rstrip())))


def gold_fields(examples: list[QAExample], window_example: list[int]) -> dict[str, Any]:
    """Each example's context (code points) and gold spans on its first window; empty rows
    on the others."""
    seen: set[int] = set()
    context, answers, n_chars, n_answers = [], [], [], []
    for example in window_example:
        first = example not in seen
        seen.add(example)
        e = examples[example]
        context.append([ord(c) for c in e.context] if first else [])
        answers.append([x for span in e.answers for x in span] if first else [])
        n_chars.append(len(e.context) if first else 0)
        n_answers.append(len(e.answers) if first else 0)
    return {
        "context": Ragged.from_rows(context, np.int32),
        "answers": Ragged.from_rows(answers, np.int32),
        "context_length": np.array(n_chars, dtype=np.int64),
        "num_answers": np.array(n_answers, dtype=np.int64),
    }


# --------------------------------------------------------------------------- model outputs


def span_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end logits in fp32, padding pushed to -inf-like (never a span or a target)."""
    out = model(**model_inputs(batch))
    pad = batch["attention_mask"] == 0
    start = out.start_logits.float().masked_fill(pad, -1e4)
    end = out.end_logits.float().masked_fill(pad, -1e4)
    return start, end


def window_loss(start: torch.Tensor, end: torch.Tensor, batch) -> torch.Tensor:
    """Summed over windows: the mean of the start and the end cross-entropy."""
    s = F.cross_entropy(start, batch["start_positions"].long(), reduction="sum")
    e = F.cross_entropy(end, batch["end_positions"].long(), reduction="sum")
    return (s + e) / 2


def _is_offset(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
