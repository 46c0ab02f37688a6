"""Adapters: LoRA through peft, anchored in closed form (``tether.adapters.anchor``).

    model, new = task.load_model(...)               # the base and its new head's names
    model = apply_lora(model, new, r=8, alpha=16)   # peft: base frozen, A/B + head trainable
    anchor = lora_anchor(model, new, lam, mode)     # λ‖s·B·A‖² on the factors, exact

The task's new head (a classifier, a token tagger) is trained in full and saved with the
adapter (peft's ``modules_to_save``): without it a merged classifier would keep a random head.
Pretrained modules named in ``modules_to_save`` are trained in full too, and anchored with the
ordinary anchor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tether.adapters.anchor import LowRankAnchor, LowRankPair
from tether.anchor import AnchorMode, build_anchor

ADAPTER_NAME = "default"  # peft's name for a model's one adapter
ADAPTER_DIR = "adapter"  # inside an exported model folder
# peft's wrappers inside a module path: 'q.base_layer.weight', 'head.modules_to_save.default.w'
_WRAPPED = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.default)(?=\.)")


def head_modules(model: torch.nn.Module, new_param_names: set[str]) -> list[str]:
    """The modules that hold newly initialised parameters (the task's head)."""
    return sorted({name.rsplit(".", 1)[0] for name in new_param_names if "." in name})


def linear_targets(model: torch.nn.Module, exclude: list[str]) -> list[str]:
    """Every nn.Linear of the base except the head and the output embedding ("all-linear")."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or module is output:
            continue
        if any(name == h or name.startswith(h + ".") for h in exclude):
            continue
        names.append(name)
    return names


def apply_lora(
    model: torch.nn.Module,
    new_param_names: set[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | str = "all-linear",
    modules_to_save: list[str] | None = None,
) -> torch.nn.Module:
    """The peft-wrapped model: LoRA factors on ``target_modules`` (module-name suffixes, or
    "all-linear"), the head and ``modules_to_save`` trained in full, everything else frozen."""
    from peft import LoraConfig, get_peft_model

    heads = head_modules(model, new_param_names)
    save = sorted(set(heads) | set(modules_to_save or []))
    targets = linear_targets(model, save) if target_modules == "all-linear" else target_modules
    if not targets:
        raise ValueError(f"model.adapter.target_modules: no module matches {target_modules!r}")
    refuse_tied_embedding_target(model, targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=save or None,
        bias="none",
    )
    return get_peft_model(model, config)


def refuse_tied_embedding_target(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Neither side of an input embedding tied to the output head can take an adapter:
    training adapts one side only, but merging writes W₀ + s·B·A into the shared matrix, so
    the merged model's other side changes too and its outputs differ from the adapter's."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is None or output is None or output.weight is not embeddings.weight:
        return
    names = [targets] if isinstance(targets, str) else targets
    for name, module in model.named_modules():
        tied = module is embeddings or module is output
        if tied and any(name == t or name.endswith("." + t) for t in names):
            raise ValueError(
                f"model.adapter.target_modules: {name!r} is tied to the "
                f"{'output head' if module is embeddings else 'input embedding'}; a merged "
                "adapter would change both (one matrix is the input lookup and the output "
                "head). Leave it out of target_modules (modules_to_save trains it in full)"
            )


def base_name(peft_name: str) -> str:
    """A peft parameter's name in the base model: 'base_model.model.bert.q.base_layer.weight'
    → 'bert.q.weight', 'classifier.modules_to_save.default.weight' → 'classifier.weight'."""
    return _WRAPPED.sub("", peft_name.removeprefix("base_model.model."))


def frozen_base(model: torch.nn.Module, new_param_names: set[str]) -> list[tuple[str, Any]]:
    """θ* of a LoRA run: the base's pretrained weights as loaded (the frozen originals, not
    the factors or the trained copies), by their base names."""
    return [
        (base_name(n), p)
        for n, p in model.named_parameters()
        if ".lora_" not in n
        and ".modules_to_save." not in n
        and base_name(n) not in new_param_names
    ]


def lora_pairs(model: torch.nn.Module) -> list[LowRankPair]:
    """Each adapted weight's (A, B, s), named as the base weight it changes."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if ADAPTER_NAME in module.lora_A:
            a, b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
        elif ADAPTER_NAME in getattr(module, "lora_embedding_A", {}):
            # an embedding's update is (B·A)ᵀ·s: the same Frobenius norm, the same gradients
            a, b = module.lora_embedding_A[ADAPTER_NAME], module.lora_embedding_B[ADAPTER_NAME]
        else:
            continue
        pairs.append(LowRankPair(base_name(name) + ".weight", a, b, module.scaling[ADAPTER_NAME]))
    return pairs


def fully_trained(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """Trainable parameters that are not LoRA factors, as (base name, parameter)."""
    return [
        (base_name(n), p)
        for n, p in model.named_parameters()
        if p.requires_grad and ".lora_" not in n
    ]


def lora_anchor(
    model: torch.nn.Module,
    new_param_names: set[str],
    lam: float,
    mode: AnchorMode,
    anchor_dtype: str = "float32",
) -> LowRankAnchor | None:
    """The LoRA run's anchor; None at λ = 0 (like the full anchor)."""
    full = [(n, p) for n, p in fully_trained(model) if n not in new_param_names]
    plain = build_anchor(full, lam, mode, anchor_dtype) if full else None
    if lam == 0:
        return None
    return LowRankAnchor(lora_pairs(model), lam, mode, plain)


def anchored_names(model: torch.nn.Module, new_param_names: set[str]) -> set[str]:
    """The peft parameter names that feel the anchor (LoRA factors and pretrained modules
    trained in full): they get the anchored optimizer group."""
    return {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (".lora_" in n or base_name(n) not in new_param_names)
    }


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the factors and fully trained modules, not the base."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def merged_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """The base with W₀ + s·B·A folded in (and the trained head), as a plain HF model.

    Merged in place: exports come last (the run's final checkpoint, an offline export), and
    a copy would need a second model's memory on the device at the end of a long run.
    """
    return model.merge_and_unload()


def save_adapter(model: torch.nn.Module, directory: Path, card: dict[str, Any]) -> None:
    """peft's adapter folder (adapter_config.json + adapter_model.safetensors, head included),
    with tether.json naming the base it needs."""
    from tether.card import write_card

    model.save_pretrained(directory)
    write_card(directory, card)


def merged_drift_l2(model: torch.nn.Module) -> float:
    """‖θ − θ*‖ over the adapted weights, from the merged matrices (a check of the closed form;
    it forms every d×k product)."""
    total = 0.0
    for pair in lora_pairs(model):
        total += float((pair.scaling * pair.b.detach() @ pair.a.detach()).double().pow(2).sum())
    return total**0.5
