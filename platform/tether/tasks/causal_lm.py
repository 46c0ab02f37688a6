"""Causal language modelling: chat SFT, prompt/completion pairs, or plain text.

Data: a ``messages`` column (chat turns, rendered with the tokenizer's *own* chat template,
so training and serving see the same text), or ``prompt`` + ``completion`` columns, or a
plain ``text`` column (continued pre-training). Targets: the assistant turns, their
end-of-turn token included (so the model learns to stop); the completion and the EOS token;
or every token. Everything else is -100. Over-long examples are cut at ``max_length`` and
counted; examples left with no target are dropped and counted (never a silent NaN).

Loss unit: the target token. Evaluation: summed NLL and target tokens (exact under DDP):
``eval/loss`` per target token and ``eval/perplexity``; greedy answers to the first
``eval.generate_examples`` validation prompts give ``eval/exact_match``; and the forgetting
probe: θ*'s greedy answers to general prompts (tasks/probe.py), scored by the model at every
evaluation, ``eval/forgetting`` = NLL_θ − NLL_θ* (0 at the start). Primary metric
``eval/loss``, minimised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tether.data import IGNORE_INDEX, DataError, Encoded, Ragged, where

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class CausalLM:
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    text_column: str = "text"
    max_length: int = 512
    packing: bool = False
    generate_examples: int = 32
    max_new_tokens: int = 32
    samples_to_log: int = 4
    forgetting_probe: str = "builtin"
    probe_max_new_tokens: int = 48
    labels: tuple[str, ...] = ()

    name = "causal-lm"
    primary_metric = "eval/loss"
    example_labels = ()  # no label set
    mode = "min"
    label_column = None
    generates = True  # served behind the OpenAI-compatible generation routes

    @classmethod
    def from_spec(cls, spec) -> CausalLM:
        d, e = spec.data, spec.eval
        return cls(
            messages_column=d.messages_column,
            prompt_column=d.prompt_column,
            completion_column=d.completion_column,
            text_column=d.text_column,
            max_length=d.max_length,
            packing=d.packing,
            generate_examples=e.generate_examples,
            max_new_tokens=e.max_new_tokens,
            samples_to_log=e.samples,
            forgetting_probe=e.forgetting_probe,
            probe_max_new_tokens=e.probe_max_new_tokens,
        )

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> CausalLM:
        generation = card.get("generation") or {}
        return cls(
            max_length=int(card.get("max_length") or 2048),
            max_new_tokens=int(generation.get("max_new_tokens", 256)),
        )

    def with_labels(self, labels) -> CausalLM:
        return self  # a language model has no label set

    def cache_key(self) -> dict[str, Any]:
        keys = (
            "messages_column",
            "prompt_column",
            "completion_column",
            "text_column",
            "max_length",
            "packing",
        )
        # encoding 3: prompt and completion tokenized apart (2), rows left-padded and an
        # example's first token no target (3); caches of older encodings are not reused
        return {"name": self.name, "encoding": 3} | {k: getattr(self, k) for k in keys}

    def num_counts(self) -> int:
        return 3

    # ------------------------------------------------------------------- data

    def label_names(self, rows, declared, hub_names) -> list[str]:
        return []

    def load_tokenizer(self, source, revision, trust_remote_code):
        from tether.models import load_tokenizer

        tokenizer = load_tokenizer(source, revision, trust_remote_code)
        if tokenizer.pad_token is None:  # batches need a pad id; it is never a target
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def render(self, row: dict, tokenizer) -> tuple[list[int], list[bool]]:
        """Token ids of one example and which of them are targets."""
        if self.messages_column in row:
            text, spans = chat_text_and_targets(tokenizer, self.messages(row))
        elif self.prompt_column in row and self.completion_column in row:
            prompt = self.string(row, self.prompt_column)
            completion = self.string(row, self.completion_column) + (tokenizer.eos_token or "")
            return prompt_and_completion_tokens(tokenizer, prompt, completion)
        elif self.text_column in row:
            text = self.string(row, self.text_column) + (tokenizer.eos_token or "")
            spans = [(0, len(text))]
        else:
            raise DataError(
                f"data: {where(row)} has none of the causal-lm columns "
                f"({self.messages_column!r}, {self.prompt_column!r}+{self.completion_column!r}, "
                f"{self.text_column!r})"
            )
        return tokens_and_targets(tokenizer, text, spans)

    def messages(self, row: dict) -> list[dict[str, str]]:
        messages = row.get(self.messages_column)
        if isinstance(messages, np.ndarray):
            messages = messages.tolist()
        if not isinstance(messages, list) or not messages:
            raise DataError(f"data.messages_column: {where(row)} is not a list of chat turns")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)
            ):
                raise DataError(
                    f"data.messages_column: {where(row)} turn {i} must be "
                    f"{{'role': one of {ROLES}, 'content': text}} (got {m!r:.80})"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"data.messages_column: {where(row)} has no assistant turn to learn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    @staticmethod
    def string(row: dict, column: str) -> str:
        value = row.get(column)
        if not isinstance(value, str) or not value:
            raise DataError(f"data: {where(row)} column {column!r} is empty or not text")
        return value

    def encode(self, rows, tokenizer, split):
        ids_rows, label_rows, starts, ends = [], [], [], []
        truncated = dropped = 0
        for row in rows:
            ids, targets = self.render(row, tokenizer)
            if len(ids) > self.max_length:
                ids, targets = ids[: self.max_length], targets[: self.max_length]
                truncated += 1
            # what generation is asked to produce (a text row's span starts at 0: no prompt)
            start, end = last_target_span(targets)
            # an example's first token follows nothing it could be predicted from (left
            # padding puts a pad, packing another example, before it): never a target
            targets = [False, *targets[1:]]
            if not any(targets):
                dropped += 1  # nothing to learn: it would divide by zero
                continue
            ids_rows.append(ids)
            label_rows.append(
                [t if keep else IGNORE_INDEX for t, keep in zip(ids, targets, strict=True)]
            )
            starts.append(start)
            ends.append(end)
        if self.packing and split == "train":
            ids_rows, label_rows = pack(ids_rows, label_rows, self.max_length)
            starts = ends = [0] * len(ids_rows)  # no generation from packed rows
        fields = {
            "labels": Ragged.from_rows(label_rows, np.int32),
            "gen_start": np.asarray(starts, dtype=np.int64),
            "gen_end": np.asarray(ends, dtype=np.int64),
        }
        encoded = Encoded(
            Ragged.from_rows(ids_rows, np.int32),
            fields,
            ("labels",),
            pad_left=True,  # rows end together: the LM head runs on the last positions only
            pad_values={"labels": IGNORE_INDEX},  # padding is no target
        )
        return encoded, {
            "examples": len(rows),
            "truncated": truncated,
            "dropped_no_target": dropped,
        }

    # ------------------------------------------------------------------- model and loss

    def load_model(self, source, revision, trust_remote_code):
        from transformers import AutoModelForCausalLM

        from tether.models import load_pretrained

        return load_pretrained(source, AutoModelForCausalLM, revision, trust_remote_code)

    def loss(self, model, batch):
        nll, units = token_nll(model, batch)
        return nll, units

    def eval_counts(self, model, batch) -> torch.Tensor:
        nll, units = token_nll(model, batch)
        return torch.tensor(
            [float(nll), float(units), float(len(batch["input_ids"]))], dtype=torch.float64
        )

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        nll, tokens, sequences = counts.tolist()
        loss = nll / tokens if tokens else 0.0
        return {
            "eval/loss": loss,
            "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/num_examples": sequences,
            "eval/target_tokens": tokens,
        }

    # ------------------------------------------------------------------- beyond the loss

    def extra_splits(self, source: str, revision, trust_remote_code, tokenizer):
        """The forgetting probe, answered by θ* (cached by θ*'s identity): its encoded split
        and θ*'s own mean NLL on it."""
        prompts = probe_prompts(self.forgetting_probe)
        if not prompts:
            return {}, {}
        answers, base_nll = theta_star_answers(
            self, source, revision, trust_remote_code, tokenizer, prompts
        )
        if base_nll is None:
            print("[tether] WARNING: θ* gave no answer to the forgetting probe; it is off")
            return {}, {"forgetting_prompts": 0}
        rows = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers, strict=True)
            if a.strip()
        ]
        probe, _ = probe_task(self).encode(rows, tokenizer, "probe")
        return {"forgetting": probe}, {
            "forgetting_base_nll": base_nll,
            "forgetting_prompts": len(rows),
        }

    def extra_metrics(self, model, tokenizer, data, score) -> dict[str, float]:
        """eval/forgetting (probe NLL now minus θ*'s) and eval/exact_match (greedy answers)."""
        out: dict[str, float] = {}
        if "forgetting" in data.extras:
            counts = score(data.extras["forgetting"], self.eval_counts, 3)
            nll = float(counts[0] / counts[1])
            out["eval/forgetting"] = nll - float(data.stats["forgetting_base_nll"])
            out["eval/forgetting_nll"] = nll
        head = prompted_rows(data.validation, self.generate_examples)
        if len(head):  # plain-text data has no prompt to answer: no exact match
            subset = data.validation.subset(head)
            counts = score(subset, lambda m, b: self.exact_match_counts(m, b, tokenizer), 2)
            out["eval/exact_match"] = float(counts[0] / max(float(counts[1]), 1.0))
        return out

    def exact_match_counts(self, model, batch, tokenizer) -> torch.Tensor:
        """[answers equal to the reference, answers]: greedy, stripped, special tokens dropped."""
        answers = greedy_answers(model, tokenizer, batch, self.max_new_tokens)
        references = reference_texts(tokenizer, batch)
        hits = sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
        return torch.tensor([float(hits), float(len(answers))], dtype=torch.float64)

    def samples(self, model, tokenizer, split: Encoded, n: int) -> list[dict[str, str]]:
        """A few generated answers beside their references, for a person to read."""
        rows = prompted_rows(split, min(n, self.samples_to_log))
        if not len(rows):
            return []
        n = len(rows)
        batch = split.collate(rows, tokenizer.pad_token_id)
        answers = greedy_answers(model, tokenizer, batch, self.max_new_tokens)
        references = reference_texts(tokenizer, batch)
        prompts = [
            tokenizer.decode(
                row_tokens(batch, i)[: int(batch["gen_start"][i])], skip_special_tokens=False
            )
            for i in range(n)
        ]
        return [
            {"prompt": p, "reference": r, "answer": a}
            for p, r, a in zip(prompts, references, answers, strict=True)
        ]

    # ------------------------------------------------------------------- export and serving

    def predictor(self, model_dir, card, max_batch_tokens: int = 0, quantize: bool = False):
        """The model for the generation engine (OpenAI-compatible routes, not /v1/predict)."""
        from tether.tasks.causal_serving import GenerativeModel

        return GenerativeModel(self, model_dir, card, quantize)

    def card(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "label_names": [],
            "max_length": self.max_length,
            "generation": {"max_new_tokens": self.max_new_tokens},
        }


# --------------------------------------------------------------------------- rendering


def chat_text_and_targets(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns, each up to and
    including its end-of-turn token (what generation must produce to stop).

    Each assistant span is what the template adds after the generation prompt for that turn:
    rendering the conversation up to the turn with ``add_generation_prompt`` must be a prefix
    of rendering it with the turn, or the template is not one a model can be served with.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.messages_column: the model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(prefix) or not text.startswith(upto):
            raise DataError(
                "data.messages_column: the chat template does not render turns incrementally; "
                "tether cannot tell the assistant's tokens apart"
            )
        # the turn up to its end-of-turn token: the template's trailing newline is no target
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


def prompt_and_completion_tokens(
    tokenizer, prompt: str, completion: str
) -> tuple[list[int], list[bool]]:
    """The prompt's tokens, then the completion's (all targets), tokenized apart: the model
    learns to continue exactly the tokens /v1/completions will give it. Tokenized together, a
    completion's first word merges with a prompt's trailing space ("A: " + "Paris" → " Paris",
    a token that starts in the prompt) and is never learnt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(completion_ids)
    return ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def tokens_and_targets(
    tokenizer, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it starts inside a target span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    targets = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    return list(ids), targets


def last_target_span(targets: list[bool]) -> tuple[int, int]:
    """[start, end) of the last run of target tokens: what generation is asked to produce."""
    end = len(targets)
    while end > 0 and not targets[end - 1]:
        end -= 1
    start = end
    while start > 0 and targets[start - 1]:
        start -= 1
    return start, end


def pack(ids_rows: list[list[int]], label_rows: list[list[int]], width: int):
    """Greedy packing in order: consecutive examples share a row until it would overflow."""
    packed_ids: list[list[int]] = []
    packed_labels: list[list[int]] = []
    for ids, labels in zip(ids_rows, label_rows, strict=True):
        if packed_ids and len(packed_ids[-1]) + len(ids) <= width:
            packed_ids[-1] += ids
            packed_labels[-1] += labels
        else:
            packed_ids.append(list(ids))
            packed_labels.append(list(labels))
    return packed_ids, packed_labels


# --------------------------------------------------------------------------- loss, generation


def token_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the target tokens, and their number.

    Rows are left-padded, so every target sits in the batch's last positions: the LM head
    (49k words for SmolLM2) runs only from the first target's predecessor on, not over the
    prompt (a chat SFT batch: ~10× fewer logits).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    width = ids.shape[1]
    targets = labels != IGNORE_INDEX
    first = int(targets.int().argmax(dim=1)[targets.any(dim=1)].min()) if targets.any() else 1
    keep = width - max(first, 1) + 1  # positions first-1 .. width-1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts nothing
    logits = forward_last(model, ids, mask, position_ids, keep)
    shifted = labels[:, width - keep + 1 :]
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        shifted.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, targets[:, 1:].sum().double()


_KEEPS_LOGITS: dict[type, bool] = {}


def forward_last(model, ids, mask, position_ids, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions (through the model's own forward, so DDP sees
    the call), computing only those where the model supports ``logits_to_keep``."""
    import inspect

    inner = getattr(model, "module", model)  # DDP wraps; its forward passes kwargs on
    if hasattr(inner, "get_base_model"):  # a peft model passes them on to its base too
        inner = inner.get_base_model()
    cls = type(inner)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    if _KEEPS_LOGITS[cls]:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep
        )
        return out.logits
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return out.logits[:, -keep:]


def row_tokens(batch, i: int) -> torch.Tensor:
    """Row i's real tokens (batches are left-padded)."""
    return batch["input_ids"][i][batch["attention_mask"][i].bool()]


def prompted_rows(split: Encoded, n: int) -> np.ndarray:
    """The first ``n`` rows whose answer follows a prompt (a chat turn, a prompt/completion
    pair). A plain-text row is all target: there is no prompt to generate from."""
    return np.flatnonzero(np.asarray(split.fields["gen_start"]) > 0)[: max(0, n)]


def left_padded_prompts(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt (tokens before its last target span), padded on the left."""
    n = len(batch["input_ids"])
    prompts = [row_tokens(batch, i)[: int(batch["gen_start"][i])] for i in range(n)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids.to(batch["input_ids"].device), mask.to(batch["input_ids"].device)


@torch.no_grad()
def greedy_answers(model, tokenizer, batch, max_new_tokens: int) -> list[str]:
    ids, mask = left_padded_prompts(batch, tokenizer.pad_token_id)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer, model),
    )
    return [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]


def stop_token_ids(tokenizer, model) -> list[int]:
    """Where generation stops: the tokenizer's EOS and the model's configured end tokens
    (an end-of-turn token that is not the tokenizer's EOS), as serving stops. Passing the
    tokenizer's alone would override the model's own and run into a new turn."""
    eos = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(configured if isinstance(configured, list) else [configured])
    return sorted(int(e) for e in eos if e is not None)


def reference_texts(tokenizer, batch) -> list[str]:
    return [
        tokenizer.decode(
            row_tokens(batch, i)[int(batch["gen_start"][i]) : int(batch["gen_end"][i])],
            skip_special_tokens=True,
        )
        for i in range(len(batch["input_ids"]))
    ]


# --------------------------------------------------------------------------- the probe


def probe_prompts(setting: str) -> list[str]:
    if setting == "none":
        return []
    if setting == "builtin":
        from tether.tasks.probe import PROBE_PROMPTS

        return list(PROBE_PROMPTS)
    from tether.tasks.probe import read_probe_prompts

    return read_probe_prompts(setting)


PROBE_MAX_LENGTH = 1024  # a probe prompt, its chat template and an answer of ≤ 64 tokens


def probe_task(task: CausalLM) -> CausalLM:
    """How the probe is encoded: one chat a row, at its own length. At the training
    max_length (32, say) every probe answer could be cut off, leaving nothing to score."""
    return dataclasses.replace(
        task, packing=False, max_length=max(task.max_length, PROBE_MAX_LENGTH)
    )


def theta_star_answers(task: CausalLM, source, revision, trust_remote_code, tokenizer, prompts):
    """θ*'s greedy answers to the probe prompts and its mean NLL on them (cached on disk)."""
    from tether.data.prepare import cache_dir, tokenizer_identity
    from tether.models import file_sha256

    weights = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    identity = {
        "source": source if not weights else None,
        "revision": revision,
        "weights": [file_sha256(w) for w in weights],
        "tokenizer": tokenizer_identity(tokenizer),
        "prompts": prompts,
        "max_new_tokens": task.probe_max_new_tokens,
        "max_length": probe_task(task).max_length,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir().parent / "probe" / f"{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        return cached["answers"], cached["base_nll"]
    model = task.load_model(source, revision, trust_remote_code).model.eval()
    chats = [[{"role": "user", "content": p}] for p in prompts]
    answers = []
    for start in range(0, len(chats), 16):
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chats[start : start + 16]
        ]
        tokenizer.padding_side, side = "left", tokenizer.padding_side
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        tokenizer.padding_side = side
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=task.probe_max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(tokenizer, model),
            )
        answers += [
            tokenizer.decode(r[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            for r in out
        ]
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in zip(prompts, answers, strict=True)
        if a
    ]
    if not rows:
        return answers, None
    probe, _ = probe_task(task).encode(rows, tokenizer, "probe")
    if not len(probe):
        return answers, None
    counts = torch.zeros(3, dtype=torch.float64)
    pad = tokenizer.pad_token_id
    for start in range(0, len(probe), 16):
        batch = probe.collate(np.arange(start, min(start + 16, len(probe))), pad)
        with torch.no_grad():
            counts += task.eval_counts(model, batch)
    base_nll = float(counts[0] / counts[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"answers": answers, "base_nll": base_nll, "identity": identity}))
    return answers, base_nll
