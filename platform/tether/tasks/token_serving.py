"""Serving a token classifier: the entities in each text, with character offsets.

Raw text is split into words here (runs of letters, combining marks and digits, and each
other non-space character on its own, as CoNLL tokenizes), the model tags each word at its
first sub-token, and the tags become entity spans by the conlleval rules used in evaluation.
Offsets index the original string: ``text[start:end]`` is the entity's surface text.
Pre-tokenized input (``{"tokens": [[...], ...]}``) gets offsets into the words joined by
single spaces, plus the word positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import regex
import torch
from pydantic import BaseModel, ConfigDict, Field, RootModel

from tether.tasks.classification_serving import text_type
from tether.tasks.entities import entities
from tether.tasks.predict import (
    DEFAULT_MAX_BATCH_TOKENS,
    forward_chunks,
    load_for_inference,
    served_max_length,
)

# Combining marks (\p{M}) belong to the word they modify: ``re``'s \w excludes them, which
# cut NFD "Jose\u0301" into "Jose" + "\u0301" and Devanagari into one word per letter.
# ZWJ/ZWNJ (Join_Control) stay inside words too: ZWNJ joins the parts of one Persian word.
WORD_CHAR = r"\p{L}\p{M}\p{N}_\p{Join_Control}"
WORD = regex.compile(rf"[{WORD_CHAR}]+|[^{WORD_CHAR}\s]")


class Entity(BaseModel):
    type: str
    text: str
    start: int = Field(description="character offset of the first character")
    end: int = Field(description="character offset after the last character")
    word_start: int
    word_end: int = Field(description="index of the last word, inclusive")
    score: float = Field(description="mean probability of the entity's tags")


class EntityPrediction(BaseModel):
    entities: list[Entity]
    truncated: bool = Field(description="words past max_length tokens were not tagged")


def entity_request_model(max_items: int, max_chars: int) -> type[BaseModel]:
    """{"text"}, {"texts"}, or {"tokens": [[word, ...], ...]} (pre-tokenized): exactly one."""

    Text = text_type(max_chars)
    Words = Annotated[list[Text], Field(min_length=1, max_length=max_chars)]  # type: ignore[valid-type]

    class OneText(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="OneText")
        text: Text  # type: ignore[valid-type]

    class ManyTexts(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="ManyTexts")
        texts: list[Text] = Field(min_length=1, max_length=max_items)  # type: ignore[valid-type]

    class Pretokenized(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="Pretokenized")
        tokens: list[Words] = Field(  # type: ignore[valid-type]
            min_length=1, max_length=max_items, examples=[[["Anna", "visited", "Paris"]]]
        )

    class EntityRequest(RootModel[OneText | ManyTexts | Pretokenized]):
        model_config = ConfigDict(title="PredictRequest")

    return EntityRequest


@dataclass(frozen=True)
class Sentence:
    """One item: its words and each word's (start, end) in ``text``."""

    text: str
    words: list[str]
    spans: list[tuple[int, int]]


def sentence_from_text(text: str) -> Sentence:
    found = list(WORD.finditer(text))
    return Sentence(text, [m.group() for m in found], [m.span() for m in found])


def sentence_from_words(words: list[str]) -> Sentence:
    spans, position = [], 0
    for w in words:
        spans.append((position, position + len(w)))
        position += len(w) + 1
    return Sentence(" ".join(words), list(words), spans)


class EntityPredictor:
    Prediction = EntityPrediction

    def __init__(
        self,
        task,
        model_dir,
        card: dict[str, Any],
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        quantize: bool = False,
    ):
        self.tokenizer, self.model = load_for_inference(task, model_dir, quantize)
        self.labels = list(card.get("label_names") or task.labels)
        self.max_length = served_max_length(card, self.tokenizer, self.model.config)
        self.max_batch_tokens = max_batch_tokens

    def items(self, request: BaseModel) -> list[Sentence]:
        body = request.root
        if hasattr(body, "tokens"):
            return [sentence_from_words(words) for words in body.tokens]
        texts = [body.text] if hasattr(body, "text") else list(body.texts)
        return [sentence_from_text(t) for t in texts]

    def item_length(self, item: Sentence) -> int:
        return len(item.text)

    def frame_items(self, column: list[Any]) -> list[Sentence]:
        return [
            sentence_from_words(list(v))
            if isinstance(v, (list, tuple))
            else sentence_from_text(str(v))
            for v in column
        ]

    def example(self) -> dict[str, Any]:
        return {"texts": ["Anna Miller visited Paris on Monday."]}

    def predict(self, sentences: list[Sentence]) -> list[EntityPrediction]:
        out: list[EntityPrediction | None] = [None] * len(sentences)
        usable = [i for i, s in enumerate(sentences) if s.words]
        for i in set(range(len(sentences))) - set(usable):  # only spaces: no words to tag
            out[i] = EntityPrediction(entities=[], truncated=False)
        if not usable:
            return out
        encoded = self.tokenizer(
            [sentences[i].words for i in usable],
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
        )
        for chunk, outputs in forward_chunks(
            self.model, self.tokenizer, encoded, self.max_batch_tokens
        ):
            probs = torch.softmax(outputs.logits.float(), dim=-1)
            for row, j in enumerate(chunk):
                i = usable[j]
                cut = bool(encoded.encodings[j].overflowing)
                out[i] = self._entities(sentences[i], encoded.word_ids(j), probs[row], cut)
        return out

    def _entities(self, sentence: Sentence, word_ids, probs, truncated: bool) -> EntityPrediction:
        n = len(sentence.words)
        tags, scores = ["O"] * n, [0.0] * n
        seen = set()
        for position, word in enumerate(word_ids):
            if word is None or word in seen:
                continue
            seen.add(word)
            score, tag = probs[position].max(dim=-1)
            tags[word], scores[word] = self.labels[int(tag)], float(score)
        found = []
        for type_, first, last in entities(tags):
            start, end = sentence.spans[first][0], sentence.spans[last][1]
            found.append(
                Entity(
                    type=type_,
                    text=sentence.text[start:end],
                    start=start,
                    end=end,
                    word_start=first,
                    word_end=last,
                    score=sum(scores[first : last + 1]) / (last - first + 1),
                )
            )
        return EntityPrediction(entities=found, truncated=truncated)
