"""Continuous batching for causal LMs on transformers: requests join and leave a running batch
between decode steps, sharing one KV cache.

    engine = TransformersEngine(generative_model, max_batch=16, max_waiting=64)
    sequence = engine.submit(prompt_ids, Sampling(max_new_tokens=64, temperature=0.0))
    async for event in sequence.events():   # Delta(text) ..., then Finished(reason, usage)
        ...

How it works: a new request is prefilled on its own (so its first token is exactly what an
offline ``generate`` computes), its KV cache is left-padded to the batch's length and
concatenated as a new row; every decode step then runs one forward for all rows (each row's
last token, its own position id, an attention mask hiding the padding). A finished or
cancelled row leaves before the next step. Forward passes run on one worker thread, so the
event loop keeps taking requests while the batch computes.

A vLLM engine (Ray Serve's ``ray.serve.llm``) can replace this one behind ``Engine`` on GPU
clusters; tether does not ship that path until something runs it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Overloaded(Exception):
    """Too many requests are waiting: shed load now (503) rather than queue without bound."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Failed:
    """The model step this sequence was in raised: the request gets a 500, others go on."""

    message: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop string), "length" (max tokens or time), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    max_batch: int  # the largest batch this sequence decoded in
    timed_out: bool = False


@dataclass(eq=False)
class Sequence:
    """One request's generation: its state in the batch and the events it produces."""

    prompt: list[int]
    sampling: Sampling
    generated: list[int] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    position: int = 0  # position id of the next token fed to the model
    emitted: int = 0  # characters of the answer already sent
    text: str = ""
    finish: str | None = None
    cancelled: bool = False
    max_batch: int = 0
    started: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    adapter: Any = None  # serving.adapters.LoadedAdapter: this row's LoRA (None: the base)
    released: bool = False  # its hold on the adapter was given back

    def cancel(self) -> None:
        """The client went away: the engine drops this row before its next step."""
        self.cancelled = True

    async def events(self) -> AsyncIterator[Delta | Finished | Failed]:
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class Engine(Protocol):
    def submit(self, prompt: list[int], sampling: Sampling, adapter: Any = None) -> Sequence: ...

    def stats(self) -> dict[str, int]: ...


class TransformersEngine:
    """Continuous batching over a Hugging Face causal LM (``tasks.causal_serving.GenerativeModel``).

    ``pool``: a ``serving.adapters.AdapterPool`` over the same model, when requests may ask for
    LoRA adapters; rows of different adapters then share each step (one adapter name per row).
    """

    def __init__(self, generative, max_batch: int = 16, max_waiting: int = 64, pool=None):
        self.lm = generative
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.cache = None  # DynamicCache over the active rows, left-padded
        self.mask: torch.Tensor | None = None  # (rows, cached length): 1 for real tokens
        self.executor = ThreadPoolExecutor(1, "tether-decode")
        self.pool = pool
        if pool is not None:
            pool.executor = self.executor  # adapter loads run between steps, on this thread
        self.model = generative.model if pool is None else pool
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.retired = False
        self.counters = {
            "requests": 0,
            "decode_steps": 0,
            "tokens": 0,
            "cancelled": 0,
            "max_batch": 0,
            "batched_steps": 0,  # decode steps with more than one row
        }

    # ------------------------------------------------------------------- requests

    def submit(self, prompt: list[int], sampling: Sampling, adapter: Any = None) -> Sequence:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests are already waiting")
        if adapter is not None:
            if self.pool is None or adapter.pool is not self.pool:
                raise ValueError(f"adapter {adapter.model_id!r} is not loaded on this engine")
            adapter.acquire()  # held until the sequence ends: an evicted adapter waits for it
        sequence = Sequence(list(prompt), sampling, adapter=adapter)
        if sampling.temperature > 0:
            sequence.generator = torch.Generator().manual_seed(
                sampling.seed if sampling.seed is not None else torch.seed() % (2**63)
            )
        self.waiting.append(sequence)
        self.counters["requests"] += 1
        self._ensure_running()
        self.wakeup.set()
        return sequence

    def stats(self) -> dict[str, Any]:
        out = dict(self.counters) | {"active": len(self.active), "waiting": len(self.waiting)}
        return out | (self.pool.stats() if self.pool is not None else {})

    def retire(self) -> None:
        """A new model took over: finish what is running, then stop (and free the model)."""
        self.retired = True
        if self.wakeup is not None:
            self.wakeup.set()

    def _ensure_running(self) -> None:
        if self.wakeup is None:
            self.wakeup = asyncio.Event()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------- the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.waiting = deque(s for s in self.waiting if not self._drop_cancelled(s))
            if not self.active and not self.waiting:
                if self.retired:
                    self.executor.shutdown(wait=False)
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            joining = []
            while self.waiting and len(self.active) + len(joining) < self.max_batch:
                joining.append(self.waiting.popleft())
            try:
                if joining:
                    firsts = await loop.run_in_executor(self.executor, self._admit, joining)
                    for sequence, first in zip(joining, firsts, strict=True):
                        if isinstance(first, Exception):  # its prefill alone failed
                            self._fail(sequence, first)
                        else:
                            self._accept(sequence, first)
                leaving = [i for i, s in enumerate(self.active) if s.finish or s.cancelled]
                if leaving:
                    dropped = await loop.run_in_executor(self.executor, self._keep, leaving)
                    self._end_cancelled(dropped)
                if not self.active:  # everyone is done: nothing to decode
                    continue
                tokens = await loop.run_in_executor(self.executor, self._step)
                for sequence, token in zip(self.active, tokens, strict=True):
                    self._accept(sequence, token)
            except Exception as e:  # never let one bad step hang every request
                self._fail_batch(joining, e)

    def _fail_batch(self, joining: list[Sequence], error: Exception) -> None:
        import logging

        logging.getLogger("ray.serve").exception("tether: a generation step failed")
        self.counters["failed_steps"] = self.counters.get("failed_steps", 0) + 1
        for sequence in {id(s): s for s in [*self.active, *joining]}.values():
            if not sequence.finish:
                self._end_failed(sequence, error)
        self.active, self.cache, self.mask = [], None, None

    def _fail(self, sequence: Sequence, error: Exception) -> None:
        """One sequence whose prefill failed (its prompt alone: out of memory on a long
        prompt, say); the batch it was to join goes on."""
        import logging

        logging.getLogger("ray.serve").error("tether: a prefill failed: %r", error)
        self.counters["failed_prefills"] = self.counters.get("failed_prefills", 0) + 1
        self._end_failed(sequence, error)

    def _end_failed(self, sequence: Sequence, error: Exception) -> None:
        sequence.finish = "error"
        sequence.queue.put_nowait(Failed(f"{type(error).__name__}: {error}"))
        _release(sequence)

    def _drop_cancelled(self, sequence: Sequence) -> bool:
        if sequence.cancelled:
            self._end_cancelled([sequence])
        return sequence.cancelled

    def _end_cancelled(self, sequences: list[Sequence]) -> None:
        """On the event loop, never the model thread: an asyncio.Queue is not thread-safe (a
        put from another thread may never wake its reader), nor is an adapter's release."""
        for sequence in sequences:
            self.counters["cancelled"] += 1
            self._finish(sequence, "cancelled")

    # ------------------------------------------------------------------- model work (one thread)

    @torch.inference_mode()
    def _admit(self, joining: list[Sequence]) -> list[int | Exception]:
        """Prefill each new sequence alone, then add its cache as a left-padded row. A
        sequence whose prefill fails gets its exception instead of a first token, and the
        batch is as if it had never come."""
        from transformers import DynamicCache

        firsts: list[int | Exception] = []
        for sequence in joining:
            try:
                out = self.model(
                    input_ids=torch.tensor([sequence.prompt]),
                    position_ids=torch.arange(len(sequence.prompt))[None, :],
                    cache=DynamicCache(),
                    use_cache=True,
                    logits_to_keep=1,
                    **self._rows_adapters([sequence]),
                )
                first = self._sample(out.logits[0, -1], sequence)
                self._merge(out.cache, len(sequence.prompt))  # all or nothing
            except Exception as e:
                firsts.append(e)
                continue
            sequence.position = len(sequence.prompt)
            firsts.append(first)
            self.active.append(sequence)
        return firsts

    def _merge(self, cache, length: int) -> None:
        from transformers import DynamicCache

        new_mask = torch.ones((1, length), dtype=torch.long)
        if self.cache is None:
            self.cache, self.mask = cache, new_mask
            return
        width = max(self.mask.shape[1], length)
        layers = []
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            layers.append((keys, values))
        mask = torch.cat([_left_pad(self.mask, width), _left_pad(new_mask, width)])
        self.cache, self.mask = DynamicCache(ddp_cache_data=layers), mask

    @torch.inference_mode()  # the cache is made of inference tensors
    def _keep(self, leaving: list[int]) -> list[Sequence]:
        """Remove finished and cancelled rows from the batch (and padding no remaining row
        needs); returns the cancelled ones, for the event loop to end."""
        from transformers import DynamicCache

        keep = [i for i in range(len(self.active)) if i not in set(leaving)]
        dropped = [self.active[i] for i in leaving if not self.active[i].finish]
        if keep:
            index = torch.tensor(keep)
            mask = self.mask[index]
            first = int((mask.sum(dim=0) > 0).int().argmax())  # leading columns all padding
            layers = [
                (layer.keys[index][..., first:, :], layer.values[index][..., first:, :])
                for layer in self.cache.layers
            ]
            self.cache, self.mask = DynamicCache(ddp_cache_data=layers), mask[:, first:]
        else:
            self.cache = self.mask = None
        # last: should the above raise, every row is still here for _fail_batch to end
        self.active = [self.active[i] for i in keep]
        return dropped

    @torch.inference_mode()
    def _step(self) -> list[int]:
        """One decode step for every row: each row's last token at its own position."""
        rows = len(self.active)
        last = torch.tensor([[s.generated[-1]] for s in self.active])
        positions = torch.tensor([[s.position] for s in self.active])
        mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **self._rows_adapters(self.active),
        )
        self.cache, self.mask = out.cache, mask
        self.counters["decode_steps"] += 1
        self.counters["batched_steps"] += rows > 1
        self.counters["max_batch"] = max(self.counters["max_batch"], rows)
        tokens = []
        for row, sequence in enumerate(self.active):
            sequence.position += 1
            sequence.max_batch = max(sequence.max_batch, rows)
            tokens.append(self._sample(out.logits[row, -1], sequence))
        return tokens

    def _rows_adapters(self, rows: list[Sequence]) -> dict[str, Any]:
        """The pool's routing argument: each row's adapter (peft's name), None for the base."""
        if self.pool is None:
            return {}
        return {"adapter_names": [s.adapter.peft_name if s.adapter else None for s in rows]}

    def _sample(self, logits: torch.Tensor, sequence: Sequence) -> int:
        """Greedy at temperature 0, else nucleus sampling with the request's own generator."""
        sampling = sequence.sampling
        if sampling.temperature < 1e-4:  # colder than this is greedy (and would overflow)
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if not torch.isfinite(probs).all():
            return int(logits.argmax())
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=sequence.generator))

    # ------------------------------------------------------------------- text and endings (loop thread)

    def _accept(self, sequence: Sequence, token: int) -> None:
        if sequence.finish or sequence.cancelled:
            return
        sampling = sequence.sampling
        if token in self.lm.eos_ids:
            self._flush(sequence, len(sequence.text))
            self._finish(sequence, "stop")
            return
        sequence.generated.append(token)
        self.counters["tokens"] += 1
        sequence.text = self.lm.decode(sequence.generated)
        cut = _stop_index(sequence.text, sampling.stop)
        if cut is not None:
            sequence.text = sequence.text[:cut]
            self._flush(sequence, cut)
            self._finish(sequence, "stop")
            return
        out_of_time = (
            sampling.timeout_s is not None
            and time.monotonic() - sequence.started > sampling.timeout_s
        )
        if len(sequence.generated) >= sampling.max_new_tokens or out_of_time:
            self._flush(sequence, len(sequence.text))
            self._finish(sequence, "length", timed_out=out_of_time)
            return
        # hold back what could still become a stop string, or half a multi-byte character
        safe = len(sequence.text) - _held_back(sequence.text, sampling.stop)
        self._flush(sequence, safe)

    def _flush(self, sequence: Sequence, upto: int) -> None:
        if upto > sequence.emitted:
            sequence.queue.put_nowait(Delta(sequence.text[sequence.emitted : upto]))
            sequence.emitted = upto

    def _finish(self, sequence: Sequence, reason: str, timed_out: bool = False) -> None:
        if sequence.finish:
            return
        sequence.finish = reason
        sequence.queue.put_nowait(
            Finished(
                reason, len(sequence.prompt), len(sequence.generated), sequence.max_batch, timed_out
            )
        )
        _release(sequence)


def _release(sequence: Sequence) -> None:
    """The sequence no longer needs its adapter (an evicted one may now be removed)."""
    if sequence.adapter is not None and not sequence.released:
        sequence.released = True
        sequence.adapter.release()


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (-2 for KV tensors, -1 for masks) on the left to ``width``."""
    if t.dim() == 2:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0))
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Trailing characters not yet safe to send: a partial stop string, or U+FFFD (a
    multi-byte character whose remaining bytes are still to come)."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return held
