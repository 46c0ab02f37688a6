"""Many LoRA adapters on one base: the base loaded once, adapters loaded on demand, and
requests for different adapters decoding in the same batch.

    catalog = AdapterCatalog(registered=["chat-a"], dirs={"support": "/models/support"})
    pool = AdapterPool(base_lm)                     # θ* once; its hash checks every adapter
    source = catalog.locate("chat-a/3")             # where "chat-a/3" lives (or UnknownAdapter)
    adapter = await pool.load(source, folder)       # injected between two decode steps
    engine.submit(prompt, sampling, adapter=adapter)  # rows of other adapters share the step

How a mixed batch works: peft keeps every loaded adapter's factors beside the base weights and,
given one adapter name per row (``adapter_names``), adds each row's own s·B·A·x to the base's
output; rows asking for the base get none. Nothing is merged, so an answer equals the merged
model's offline answer (within fp32 rounding) while the base is held once.

Loading and unloading change the model's modules, so they run on the engine's one model
thread, between two steps: a load holds other requests back for the injection only (the
download and the file read happen before, off that thread). An adapter that Serve's LRU evicts
is removed once its last running request finishes. No Ray here: the Serve replica
(``tether.serving.openai``) wires this to ``@serve.multiplexed``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.card import read_card

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
_VERSIONED = re.compile(
    r"^(?:models:/)?(?P<name>[^/@\s]+)(?:/(?P<version>\d+)|@(?P<alias>[^/\s]+))$"
)


class UnknownAdapter(LookupError):
    """The requested model id names no adapter this deployment may serve (a 404)."""


class AdapterMismatch(ValueError):
    """The adapter was trained on another base than the one served here (a 400)."""


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter id lives: a local folder, or a registered model version to fetch."""

    model_id: str  # as requested: "chat-a/3", "chat-a@champion", "support"
    folder: str | None = None  # a local adapter folder (or an export holding adapter/)
    model_uri: str | None = None  # models:/NAME/VERSION or models:/NAME@ALIAS


class AdapterCatalog:
    """Which ids may be loaded: local folders by id, and versions of allowed registered models.

    ``registered``: registered-model names whose versions and aliases may be requested as
    ``NAME/VERSION`` or ``NAME@ALIAS`` (``models:/`` prefix optional); ``["*"]`` allows any.
    Anything else is an UnknownAdapter naming the id: a request never makes the replica
    fetch an arbitrary model.
    """

    def __init__(self, registered: list[str] | None = None, dirs: dict[str, str] | None = None):
        self.registered = list(registered or [])
        self.dirs = dict(dirs or {})

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> AdapterCatalog | None:
        """From user_config's ``adapters`` block ({"registered": [...], "dirs": {...}})."""
        if config is None:
            return None
        unknown = sorted(set(config) - {"registered", "dirs"})
        if unknown:
            raise ValueError(f"user_config.adapters: unknown keys {unknown} (registered, dirs)")
        registered, dirs = config.get("registered") or [], config.get("dirs") or {}
        if not isinstance(registered, list) or not all(isinstance(n, str) for n in registered):
            raise ValueError("user_config.adapters.registered: a list of registered model names")
        if not isinstance(dirs, dict):
            raise ValueError("user_config.adapters.dirs: a mapping of id to adapter folder")
        for model_id, folder in dirs.items():
            if _VERSIONED.match(model_id) and "/" in model_id:
                raise ValueError(
                    f"user_config.adapters.dirs: id {model_id!r} looks like NAME/VERSION"
                )
            adapter_folder(Path(folder))  # a missing folder fails the deploy, not a request
        return cls(registered, dirs)

    def locate(self, model_id: str) -> AdapterSource:
        if model_id in self.dirs:
            return AdapterSource(model_id, folder=self.dirs[model_id])
        match = _VERSIONED.match(model_id)
        if match and (match["version"] or match["alias"]) and self.allows(match["name"]):
            ref = f"/{match['version']}" if match["version"] else f"@{match['alias']}"
            return AdapterSource(model_id, model_uri=f"models:/{match['name']}{ref}")
        raise UnknownAdapter(f"model {model_id!r} is not served here ({self.describe()})")

    def allows(self, name: str) -> bool:
        return "*" in self.registered or name in self.registered

    def describe(self) -> str:
        parts = [f"adapters {sorted(self.dirs)}"] if self.dirs else []
        if self.registered:
            parts.append(f"versions of registered models {sorted(self.registered)}")
        return "; ".join(parts) or "no adapters are configured"


def adapter_folder(folder: Path) -> Path:
    """The peft adapter folder inside ``folder`` (an export holds it as adapter/)."""
    for candidate in (folder / "adapter", folder):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no LoRA adapter here (adapter_config.json not found)")


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter in the pool: its peft name, its identity, and the requests using it."""

    model_id: str
    peft_name: str
    card: dict[str, Any]
    pool: AdapterPool
    in_flight: int = 0
    retired: bool = False
    removed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        """What a response's ``model`` field says: the id the client asked for."""
        return self.model_id

    def acquire(self) -> None:
        with self.lock:
            if self.removed:
                raise RuntimeError(f"adapter {self.model_id!r} was unloaded")
            self.in_flight += 1

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1
            remove = self.retired and self.in_flight == 0 and not self.removed
            self.removed |= remove
        if remove:
            self.pool.remove_later(self)

    def __del__(self) -> None:
        """Serve's LRU evicted it (or it was garbage collected): remove its factors once its
        last request is done. Idempotent; safe from any thread."""
        lock = getattr(self, "lock", None)
        if lock is None:
            return
        with lock:
            self.retired = True
            remove = self.in_flight == 0 and not self.removed
            self.removed |= remove
        if remove:
            self.pool.remove_later(self)


class AdapterPool:
    """The base model (loaded once) and the adapters on it; the engine's forward callable.

    ``executor``: the engine's one model thread. Everything that touches the modules (a
    forward pass, injecting or removing an adapter) runs there, so they never overlap.
    """

    def __init__(self, base, executor=None):
        from tether.anchor import weights_hash

        self.base = base  # tasks.causal_serving.GenerativeModel: tokenizer, model, eos ...
        self.model = base.model  # a PeftModel once the first adapter is loaded
        self.executor = executor
        # θ*'s identity as training records it (every weight by name, in fp32)
        self.base_sha256 = weights_hash(base.model.named_parameters())
        self.names = itertools.count()
        self.loaded: dict[str, LoadedAdapter] = {}  # peft name → adapter
        self.counters = {"base_loads": 1, "adapter_loads": 0, "adapter_unloads": 0}

    # ------------------------------------------------------------------- the forward pass

    def __call__(self, adapter_names: list[str | None], **inputs):
        """The model on a batch whose rows may each ask for an adapter (None: the base)."""
        if self.loaded_any:
            names = [BASE if n is None else n for n in adapter_names]
            return self.model(adapter_names=names, **inputs)
        if any(n is not None for n in adapter_names):
            raise RuntimeError("an adapter row reached a pool with no adapters loaded")
        return self.model(**inputs)

    @property
    def loaded_any(self) -> bool:
        return bool(self.loaded)

    # ------------------------------------------------------------------- loading

    async def load(self, source: AdapterSource, folder: Path) -> LoadedAdapter:
        """Check the adapter's lineage, then inject it on the model thread."""
        folder = adapter_folder(Path(folder))
        card = read_card(folder) if (folder / "tether.json").is_file() else {}
        self.check_lineage(source.model_id, card, folder)
        adapter = LoadedAdapter(source.model_id, f"a{next(self.names)}", card, self)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._inject, adapter, folder)
        return adapter

    def check_lineage(self, model_id: str, card: dict[str, Any], folder: Path) -> None:
        """The adapter's θ* must be this base, or its factors would be added to other weights."""
        objective = card.get("objective") or {}
        recorded = objective.get("theta_star_sha256")
        if card.get("task") not in (None, "causal-lm"):
            raise AdapterMismatch(f"model {model_id!r} is a {card['task']} adapter, not causal-lm")
        if recorded is None:
            raise AdapterMismatch(
                f"model {model_id!r}: {folder} records no base identity "
                "(objective.theta_star_sha256 in tether.json): tether cannot check its base"
            )
        if recorded != self.base_sha256:
            raise AdapterMismatch(
                f"model {model_id!r} was trained on another base "
                f"({objective.get('base_model')!r}, θ* {recorded[:12]}) than the one served "
                f"here (θ* {self.base_sha256[:12]})"
            )

    @torch.inference_mode()
    def _inject(self, adapter: LoadedAdapter, folder: Path) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(folder), adapter_name=adapter.peft_name)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, str(folder), adapter_name=adapter.peft_name
            )
        self.model.eval()
        self.loaded[adapter.peft_name] = adapter
        self.counters["adapter_loads"] += 1

    # ------------------------------------------------------------------- unloading

    def remove_later(self, adapter: LoadedAdapter) -> None:
        """Queue the removal on the model thread (called from any thread)."""
        if self.executor is None:
            self._remove(adapter)
            return
        try:
            self.executor.submit(self._remove, adapter)
        except RuntimeError:  # the engine was retired: its model goes with it
            pass

    def _remove(self, adapter: LoadedAdapter) -> None:
        if self.loaded.pop(adapter.peft_name, None) is None:
            return
        self.counters["adapter_unloads"] += 1
        if not self.loaded:
            self.model = self.model.unload()  # the plain base again, its modules restored
            return
        if adapter.peft_name in self.model.active_adapters:
            self.model.set_adapter(next(iter(self.loaded)))  # peft needs a live active one
        self.model.delete_adapter(adapter.peft_name)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters) | {
            "adapters_loaded": sorted(a.model_id for a in self.loaded.values())
        }
