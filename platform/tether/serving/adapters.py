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
is removed once its last running request finishes. No Ray here: the Serve replicas
(``tether.serving.openai`` for generation, ``tether.serving.app`` for /v1/predict with
``HeadAdapterPool``) wire this to ``@serve.multiplexed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.card import MODEL_CARD_FILE, read_card

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
    predictor: Any = None  # /v1/predict tasks: the adapter's own predictor (head, labels)
    served: Any = None  # ... and it with its identity (a tether.serving.model.ServedModel)

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
        self.retire()

    def retire(self) -> None:
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

    task_name = "causal-lm"  # the task every adapter here must have been trained for

    def __init__(self, base, executor=None):
        from tether.anchor import weights_hash

        self.base = base  # tasks.causal_serving.GenerativeModel: tokenizer, model, eos ...
        # θ*'s identity as training records it (every weight by name, in fp32)
        self._start(base.model, weights_hash(base.model.named_parameters()), executor)

    def _start(self, model, base_sha256: str, executor) -> None:
        self.model = model  # a PeftModel once the first adapter is loaded
        self.executor = executor
        self.base_sha256 = base_sha256
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

    def holds(self, model_id: str) -> bool:
        """Whether ``model_id`` is loaded here (read from any thread: a snapshot)."""
        return any(a.model_id == model_id for a in list(self.loaded.values()))

    # ------------------------------------------------------------------- loading

    async def load(self, source: AdapterSource, folder: Path) -> LoadedAdapter:
        """Check the adapter's lineage, then inject it on the model thread."""
        folder = adapter_folder(Path(folder))
        card = read_card(folder) if (folder / "tether.json").is_file() else {}
        self.check_lineage(source.model_id, card, folder)
        adapter = LoadedAdapter(source.model_id, f"a{next(self.names)}", card, self)
        loop = asyncio.get_running_loop()
        injection = loop.run_in_executor(self.executor, self._inject, adapter, folder)
        try:
            await asyncio.shield(injection)  # an injection cannot stop halfway
        except asyncio.CancelledError:
            # The request went away before Serve's LRU got the adapter, so nothing would
            # ever evict it: it leaves as soon as it is in.
            injection.add_done_callback(lambda done: _retire_if_injected(done, adapter))
            raise
        return adapter

    def check_lineage(self, model_id: str, card: dict[str, Any], folder: Path) -> None:
        """The adapter's θ* must be this base, or its factors would be added to other weights."""
        objective = card.get("objective") or {}
        recorded = objective.get("theta_star_sha256")
        if card.get("task", self.task_name) != self.task_name:
            raise AdapterMismatch(
                f"model {model_id!r} is a {card['task']} adapter, not {self.task_name}"
            )
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

    @torch.inference_mode()  # the factors were made under it: peft's bookkeeping touches them
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


def _retire_if_injected(injection: asyncio.Future, adapter: LoadedAdapter) -> None:
    if not injection.cancelled() and injection.exception() is None:
        adapter.retire()


# --------------------------------------------------------------------------- /v1/predict tasks


class HeadAdapterPool(AdapterPool):
    """Adapters for the /v1/predict tasks (classifiers, taggers, QA) on one base encoder.

    Each adapter carries its own head and label set (peft's ``modules_to_save``), so two
    adapters may predict different labels, even a different number of them. Rows of different
    adapters cannot share a forward pass (their heads differ in shape): the replica groups a
    batch by adapter, and each group runs with its adapter active. A request without an
    adapter goes to the base's own head when the base is a tether-trained model of the same
    task (its card says so); a pretrained base has no head to answer with.
    """

    def __init__(self, task_name: str, base_dir: Path, max_batch_tokens: int, executor=None):
        from tether.anchor import weights_hash
        from tether.serving.model import base_card

        self.task_name = task_name
        self.base_dir = Path(base_dir)
        self.base_card = base_card(self.base_dir, task_name)
        # a tether-trained model of this task has a head to answer with (its card says so);
        # a pretrained base has only the placeholder head its task model was built with
        trained = (self.base_dir / MODEL_CARD_FILE).is_file()
        self.has_head = trained and self.base_card.get("task") == task_name
        loaded = self.base_task().load_model(str(base_dir), None, False)
        model = loaded.model.eval()
        self.tokenizer = self.base_task().load_tokenizer(str(base_dir), None, False)
        self.max_batch_tokens = max_batch_tokens
        # θ* as a LoRA run records it: every pretrained weight, without the new head (a
        # tether-trained base has none: the adapters trained on it kept its head)
        backbone = [(n, p) for n, p in model.named_parameters() if n not in loaded.new_param_names]
        self._start(model, weights_hash(backbone), executor)

    def base_task(self):
        """The base's task: with its own labels, or (a pretrained base) with none."""
        from tether.tasks import task_class, task_for_card

        return task_for_card(self.base_card) if self.has_head else task_class(self.task_name)()

    def forward(self, peft_name: str | None, **inputs):
        """The model with one adapter's factors and head (None: the base's own modules), on
        the replica's one inference thread like every change to the modules. Named per row
        (peft's ``adapter_names``), so no adapter is ever "active" between calls."""
        if not self.loaded_any:
            return self.model(**inputs)
        rows = len(inputs["input_ids"])
        return self.model(adapter_names=[peft_name or BASE] * rows, **inputs)

    async def load(self, source: AdapterSource, folder: Path) -> LoadedAdapter:
        """Load the adapter; its ``served`` model answers /v1/predict with its own labels."""
        from tether.serving.model import describe_served

        adapter = await super().load(source, folder)
        adapter.served = describe_served(
            adapter.predictor,
            adapter_folder(Path(folder)),
            adapter.card,
            source.model_uri,
            name=source.model_id,
        )
        return adapter

    def describe_base(self, model_uri: str | None = None, alias: str | None = None):
        """The base as a served model (its head, or none: then it lists no labels)."""
        import dataclasses

        from tether.serving.model import describe_served

        served = describe_served(
            self.base_predictor(), self.base_dir, self.base_card, model_uri, alias
        )
        if not self.has_head:
            served.info = dataclasses.replace(served.info, label_names=[])
        return served

    def base_predictor(self):
        """The base's own predictor (its head and labels); for a pretrained base, one on the
        placeholder head the task model was built with (requests never reach it)."""
        from tether.tasks.predict import Preloaded

        view = AdapterView(self, None, self.model.config)
        return self.base_task().predictor(
            Preloaded(self.tokenizer, view), self.base_card, self.max_batch_tokens
        )

    @torch.inference_mode()
    def _inject(self, adapter: LoadedAdapter, folder: Path) -> None:
        from tether.tasks import task_for_card
        from tether.tasks.predict import Preloaded

        labels = list(adapter.card.get("label_names") or [])
        if not labels and task_for_card(adapter.card).example_labels:  # a task with labels
            raise AdapterMismatch(f"model {adapter.model_id!r}: its card names no label_names")
        with heads_sized_for(self.model, folder):
            super()._inject(adapter, folder)
        config = copy.deepcopy(self.model.config)
        if labels:  # a span head (QA) keeps its two outputs
            config.num_labels = len(labels)
        view = AdapterView(self, adapter.peft_name, config)
        adapter.predictor = task_for_card(adapter.card).predictor(
            Preloaded(self.tokenizer, view), adapter.card, self.max_batch_tokens
        )

    @torch.inference_mode()
    def _remove(self, adapter: LoadedAdapter) -> None:
        """As for any pool; when the last adapter goes, peft's unload would leave one
        adapter's head in place of the base's: the base's own head is put back."""
        from peft.utils import ModulesToSaveWrapper

        last = list(self.loaded) == [adapter.peft_name]
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else None
        originals = {
            path: module.original_module
            for path, module in (base.named_modules() if last and base is not None else ())
            if isinstance(module, ModulesToSaveWrapper)
        }
        super()._remove(adapter)
        for path, original in originals.items():
            _set_submodule(self.model, path, original)


@dataclass(eq=False)
class AdapterView:
    """What a predictor calls its model: the pool's base with one adapter active."""

    pool: HeadAdapterPool
    peft_name: str | None
    config: Any

    def __call__(self, **inputs):
        return self.pool.forward(self.peft_name, **inputs)


@contextlib.contextmanager
def heads_sized_for(model: torch.nn.Module, folder: Path):
    """The modules the adapter trains in full (its head), for the duration, replaced by copies
    shaped like the adapter's saved weights.

    peft gives each adapter its own copy of every ``modules_to_save`` module, then loads the
    adapter's weights into the copy: the copy must have the adapter's shape (its number of
    labels), whatever the base's own head has. The base's own modules are put back after."""
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = saved_shapes(folder)
    swapped = []
    for path, module in list(base.named_modules()):
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        wanted = {
            name.removeprefix(path + "."): shape
            for name, shape in saved.items()
            if name.startswith(path + ".") and "." not in name.removeprefix(path + ".")
        }
        if not isinstance(original, torch.nn.Linear) or "weight" not in wanted:
            continue
        if tuple(original.weight.shape) == wanted["weight"]:
            continue
        out_features, in_features = wanted["weight"]
        sized = torch.nn.Linear(in_features, out_features, bias="bias" in wanted)
        swapped.append((path, original))
        if isinstance(module, ModulesToSaveWrapper):
            module.original_module = sized
        else:
            _set_submodule(base, path, sized)
    try:
        yield
    finally:
        for path, original in swapped:
            now = base.get_submodule(path)
            if isinstance(now, ModulesToSaveWrapper):
                now.original_module = original
            else:
                _set_submodule(base, path, original)


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the fully trained weights an adapter folder holds, by their name in the base
    model ('classifier.weight'), read from the file header (no tensor is loaded)."""
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".lora_" not in key:
                shapes[key.removeprefix("base_model.model.")] = tuple(f.get_slice(key).get_shape())
    return shapes


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


# --------------------------------------------------------------------------- the request edge


def refuse_base_swap(serving_adapters: bool) -> None:
    """Loaded adapters belong to their base (Serve's LRU holds them): a new base is a new
    application, not a hot swap."""
    if serving_adapters:
        raise ValueError(
            "user_config: the base of an adapter deployment cannot be swapped in place; "
            "deploy a new application"
        )


def refuse_adapter_toggle(serving_adapters: bool, catalog: AdapterCatalog | None) -> None:
    """A live deployment's base was loaded for adapters (a pool beside it) or not: adding or
    removing ``user_config.adapters`` would need another load, so it is a new application."""
    if serving_adapters != (catalog is not None):
        raise ValueError(
            "user_config.adapters: adapters cannot be added to or removed from a running "
            "deployment (its base is loaded for them, or not); deploy a new application"
        )


async def adapter_for_request(
    pool: AdapterPool,
    catalog: AdapterCatalog,
    get_adapter,
    model_id: str,
    param: str,
    tracking_uri: str | None,
):
    """The loaded adapter for ``model_id`` through the replica's multiplexed loader, or the
    RequestError the client gets: 404 for an id not served here, 400 for another base.

    Serve's loader evicts its least recently used adapter *before* it loads: a request bound
    to fail (no such version, an adapter of another base) is refused before it gets there,
    or any client could empty the cache with bad ids."""
    from tether.serving.contract import RequestError

    try:
        source = catalog.locate(model_id)  # unknown ids are refused before any loading
        if not pool.holds(model_id):
            await asyncio.to_thread(check_before_loading, pool, source, tracking_uri)
        return await get_adapter(model_id)
    except UnknownAdapter as e:
        raise RequestError(404, "model_not_found", str(e), param) from None
    except (AdapterMismatch, ValueError) as e:  # another base; not a LoRA version
        raise RequestError(400, "model_not_compatible", str(e), param) from None
    except FileNotFoundError as e:
        raise RequestError(404, "model_not_found", f"model {model_id!r}: {e}", param) from None
    except Exception as e:
        if _registry_missing(e):
            raise RequestError(
                404, "model_not_found", f"model {model_id!r} is not registered", param
            ) from None
        raise


def check_before_loading(pool: AdapterPool, source: AdapterSource, tracking_uri) -> None:
    """What can be checked without loading the adapter: that it exists and names this base
    (a folder's card; a registered version's tags, nothing downloaded). A version registered
    without lineage tags is checked once downloaded, as before."""
    if source.folder is not None:
        folder = adapter_folder(Path(source.folder))
        card = read_card(folder) if (folder / "tether.json").is_file() else {}
        pool.check_lineage(source.model_id, card, folder)
        return
    from tether.registry import version_tags

    tags = version_tags(source.model_uri, tracking_uri)
    if tags.get("tether.theta_star_sha256"):
        card = {
            "task": tags.get("tether.task", pool.task_name),
            "objective": {
                "theta_star_sha256": tags["tether.theta_star_sha256"],
                "base_model": tags.get("tether.base_model"),
            },
        }
        pool.check_lineage(source.model_id, card, Path(source.model_uri))


def fetch_adapter(source: AdapterSource, tracking_uri: str | None) -> Path:
    """The adapter's folder on this node: a configured folder, or the registered version's
    adapter/ downloaded (not its merged weights)."""
    if source.folder is not None:
        return Path(source.folder)
    from tether.registry import fetch_adapter_dir

    return fetch_adapter_dir(source.model_uri, tracking_uri)


async def load_adapter(pool: AdapterPool, catalog: AdapterCatalog, model_id: str, tracking_uri):
    """Locate, fetch (off the event loop) and load one adapter into ``pool``; a registry
    download is deleted once its weights are in memory."""
    source = catalog.locate(model_id)
    download = asyncio.ensure_future(asyncio.to_thread(fetch_adapter, source, tracking_uri))
    try:
        folder = await asyncio.shield(download)  # a download thread cannot be stopped
    except asyncio.CancelledError:
        # The request went away mid-download: the thread goes on, and its folder is deleted
        # once it lands (nobody else knows where it is).
        download.add_done_callback(lambda done: _discard_if_fetched(done, source))
        raise
    try:
        return await pool.load(source, folder)
    finally:
        _discard_fetched(source, folder)


def _discard_fetched(source: AdapterSource, folder: Path) -> None:
    """Delete a registry download (a configured folder is the user's and stays)."""
    if source.model_uri is not None:
        from tether.registry import discard_download

        discard_download(folder)


def _discard_if_fetched(download: asyncio.Future, source: AdapterSource) -> None:
    if not download.cancelled() and download.exception() is None:
        _discard_fetched(source, download.result())


def _registry_missing(error: Exception) -> bool:
    """MLflow's "no such registered model / version / alias"."""
    return getattr(error, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
