"""A causal LM loaded for serving: tokenizer, weights, and the exact prompt rendering of training.

Chat prompts are rendered with the model's own chat template (the one its training data was
rendered with) and tokenized without extra special tokens, as in training, so a served answer
equals an offline ``generate`` on the same prompt. The decoding loop itself (batching,
sampling, streaming) is the serving engine's (``tether.serving.engine``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from tether.errors import ModelSourceError
from tether.tasks.causal_lm import stop_token_ids
from tether.tasks.predict import quantize_linear_int8


class Answer(BaseModel):
    """One greedy answer (the MLflow pyfunc's output row)."""

    answer: str


class GenerativeModel:
    """What the generation engine needs from a model directory (and, for MLflow's pyfunc,
    greedy answers to a column of user messages)."""

    labels: list[str] = []

    def __init__(self, task, model_dir, card: dict[str, Any], quantize: bool = False):
        self.tokenizer = task.load_tokenizer(str(model_dir), None, False)
        model = task.load_model(str(model_dir), None, False).model.eval()
        self.model = quantize_linear_int8(model) if quantize else model
        config = self.model.config
        # what the model can attend to; the training max_length is not a serving limit
        self.max_length = int(
            getattr(config, "max_position_embeddings", 0) or card.get("max_length") or 2048
        )
        self.default_max_tokens = int((card.get("generation") or {}).get("max_new_tokens", 256))
        self.eos_ids = set(stop_token_ids(self.tokenizer, self.model))
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise ModelSourceError("this model has no chat template: use /v1/completions")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def offline_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Reference decoding with Hugging Face generate (tests and checks)."""
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
        )
        generated = out[0, ids.shape[1] :].tolist()
        return [t for t in generated if t not in self.eos_ids]

    # ------------------------------------------------------------------- the pyfunc's path

    def example(self) -> dict[str, Any]:
        return {"texts": ["What is the capital of France?"]}

    def frame_items(self, column: list[Any]) -> list[str]:
        return [str(v) for v in column]

    def predict(self, messages: list[str]) -> list[Answer]:
        """Greedy answers to user messages, one at a time (offline use, not serving)."""
        limit = min(self.default_max_tokens, 64)
        return [
            Answer(
                answer=self.decode(
                    self.offline_greedy(self.chat_prompt([{"role": "user", "content": m}]), limit)
                )
            )
            for m in messages
        ]
