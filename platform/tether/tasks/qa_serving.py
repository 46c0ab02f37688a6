"""Serving extractive QA: {"question", "context"} in, the answer span with its offsets out.

A context longer than one window is read in overlapping windows exactly as in training
(``encode_windows``), the windows of all items in a request batch share forward passes
(chunked by padded tokens), and the best span over an item's windows is its answer
(``tether.tasks.spans``). ``context[start:end]`` is always the answer text; a model trained
with unanswerable questions may answer nothing (``answer: ""``, ``start``/``end`` null).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tether.tasks.classification_serving import text_type
from tether.tasks.predict import (
    DEFAULT_MAX_BATCH_TOKENS,
    RequestTooLarge,
    forward_chunks,
    load_for_inference,
    one_or_many,
    served_max_length,
)
from tether.tasks.question_answering import cut_questions, encode_windows
from tether.tasks.spans import best_answer

# windows one request may need: each is a forward pass of up to max_length tokens, and a
# request's 64 contexts of 20,000 characters could otherwise ask for over a thousand
MAX_WINDOWS_PER_REQUEST = 256

EXAMPLE = {
    "question": "Where was Lena Okafor born?",
    "context": "Lena Okafor was born in Tarsk in 1871. She worked as a glassblower in Velm.",
}


class AnswerPrediction(BaseModel):
    answer: str = Field(description='the answer text ("" when the model answers nothing)')
    start: int | None = Field(description="offset of the answer's first character in context")
    end: int | None = Field(description="offset after its last character: context[start:end]")
    score: float = Field(description="start × end probability of the span in its window")
    no_answer_probability: float = Field(
        description="probability of 'no answer in this window' where it is lowest"
    )
    windows: int = Field(description="windows the context was read in (1 when it fit one)")


def qa_request_model(max_items: int, max_chars: int) -> type[BaseModel]:
    """{"question", "context"} or {"items": [{"question", "context"}, ...]}: exactly one."""

    Text = text_type(max_chars)

    class Question(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="Question")
        question: Text = Field(examples=[EXAMPLE["question"]])  # type: ignore[valid-type]
        context: Text = Field(examples=[EXAMPLE["context"]])  # type: ignore[valid-type]

    return one_or_many(Question, "ManyQuestions", max_items)


@dataclass(frozen=True)
class QAItem:
    question: str
    context: str


class AnswerPredictor:
    Prediction = AnswerPrediction
    frame_columns = ("question", "context")  # what a pyfunc DataFrame must hold

    def __init__(
        self,
        task,
        model_dir,
        card: dict[str, Any],
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        quantize: bool = False,
    ):
        self.task = task
        self.tokenizer, self.model = load_for_inference(task, model_dir, quantize)
        self.labels: list[str] = []
        self.max_length = served_max_length(card, self.tokenizer, self.model.config)
        self.max_batch_tokens = max_batch_tokens

    def items(self, request: BaseModel) -> list[QAItem]:
        body = request.root
        questions = body.items if hasattr(body, "items") else [body]
        items = [QAItem(q.question, q.context) for q in questions]
        # Counted from tokens, never bounded from characters: a character may be several
        # tokens (BERT splits a Hangul syllable into 2-3 jamo tokens, byte-level BPE an emoji
        # into up to 4), so no characters-per-token bound holds for every tokenizer.
        # Counting stops once over the limit: a refused request costs at most the
        # tokenization of a request that would have been served.
        counted, windows = 0, 0
        for windows_here in self.windows_per_item(items):
            counted, windows = counted + 1, windows + windows_here
            if windows > MAX_WINDOWS_PER_REQUEST:
                if counted < len(items):
                    which = f"the first {counted} of the {len(items)} contexts already need"
                else:
                    which = "the context needs" if counted == 1 else f"the {counted} contexts need"
                raise RequestTooLarge(
                    f"context: {which} {windows} windows of {self.max_length} tokens; one "
                    f"request may need at most {MAX_WINDOWS_PER_REQUEST} (send fewer or "
                    "shorter contexts per request)",
                    "context",
                )
        return items

    def count_windows(self, items: list[QAItem]) -> int:
        """Windows the items' contexts take, as ``encode_windows`` splits them."""
        return sum(self.windows_per_item(items))

    def windows_per_item(self, items: list[QAItem], chunk: int = 8) -> Iterator[int]:
        """Each item's windows, as ``encode_windows`` splits them (from the question's and the
        context's token counts, without tokenizing the pairs), ``chunk`` items per tokenizer
        call so that a caller can stop early."""
        task = self.task
        specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        # counted, not fed to the model: no "longer than the maximum" warning
        tokens = dict(add_special_tokens=False, verbose=False)
        for at in range(0, len(items), chunk):
            part = items[at : at + chunk]
            cut = cut_questions(
                self.tokenizer, [i.question for i in part], task.max_question_length
            )
            asked = self.tokenizer([q for q, _ in cut], **tokens)["input_ids"]
            read = self.tokenizer([i.context for i in part], **tokens)["input_ids"]
            for question, context in zip(asked, read, strict=True):
                room = self.max_length - specials - len(question)  # context tokens per window
                beyond = max(0, len(context) - room)
                yield 1 + -(-beyond // (room - task.doc_stride))  # ceil division

    def item_length(self, item: QAItem) -> int:
        return len(item.question) + len(item.context)

    def frame_items(self, column: list[Any]) -> list[QAItem]:
        """Rows of a DataFrame's ``frame_columns`` (as dicts)."""
        return [QAItem(str(row["question"]), str(row["context"])) for row in column]

    def example(self) -> dict[str, Any]:
        return {"items": [EXAMPLE]}

    def predict(self, items: list[QAItem]) -> list[AnswerPrediction]:
        task = self.task
        windows = encode_windows(
            self.tokenizer,
            [i.question for i in items],
            [i.context for i in items],
            self.max_length,
            task.doc_stride,
            task.max_question_length,
        )
        logits: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(windows.input_ids)
        features = {"input_ids": windows.input_ids}
        if windows.token_type_ids is not None:
            features["token_type_ids"] = windows.token_type_ids
        for chunk, out in forward_chunks(
            self.model, self.tokenizer, features, self.max_batch_tokens
        ):
            for row, j in enumerate(chunk):
                n = len(windows.input_ids[j])
                logits[j] = (
                    out.start_logits[row, :n].float().numpy(),
                    out.end_logits[row, :n].float().numpy(),
                )
        per_item: list[list[tuple]] = [[] for _ in items]
        for j, i in enumerate(windows.example):
            start, end = logits[j]
            per_item[i].append(
                (start, end, np.array(windows.char_start[j]), np.array(windows.char_end[j]))
            )
        return [self._prediction(item, w) for item, w in zip(items, per_item, strict=True)]

    def _prediction(self, item: QAItem, windows: list[tuple]) -> AnswerPrediction:
        task = self.task
        span, null_probability = best_answer(
            windows, task.max_answer_length, task.unanswerable, task.null_score_threshold
        )
        if span is None:
            return AnswerPrediction(
                answer="",
                start=None,
                end=None,
                score=0.0,
                no_answer_probability=null_probability,
                windows=len(windows),
            )
        return AnswerPrediction(
            answer=item.context[span.start : span.end],
            start=span.start,
            end=span.end,
            score=span.probability,
            no_answer_probability=null_probability,
            windows=len(windows),
        )
