"""Setting up one worker's run: model, θ*, optimizer, schedule, resume. The loop itself is in
``tether.train.loop``; everything here runs once, before the first step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tether.adapters import anchored_names as lora_anchored_names
from tether.adapters import apply_lora, frozen_base, lora_anchor
from tether.adapters.anchor import LowRankAnchor
from tether.anchor import Anchor, anchored_parameters, build_anchor, weights_hash
from tether.config import JobSpec
from tether.data import PreparedData, steps_per_epoch
from tether.models import freeze_parameters, new_heads_allowed, resolve_model_source
from tether.tasks import Task
from tether.train.checkpoint import load_loop_state, load_training_state
from tether.train.strategy import Strategy

_AUTOCAST = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


@dataclass
class Plan:
    """How long the run is and when it evaluates, in optimizer steps (every rank agrees)."""

    steps_per_epoch: int
    total_steps: int
    eval_interval: int

    def is_eval_step(self, step: int) -> bool:
        return step % self.eval_interval == 0 or step == self.total_steps


def make_plan(spec: JobSpec, num_examples: int, world: int) -> Plan:
    per_epoch = steps_per_epoch(
        num_examples, spec.train.batch_size, spec.train.grad_accum_steps, world
    )
    total = spec.train.max_steps or spec.train.epochs * per_epoch
    return Plan(per_epoch, total, spec.train.eval_interval or per_epoch)


def scheduled_lrs(spec: JobSpec, plan: Plan) -> list[float]:
    """lr_t for each of the run's optimizer steps: the lr each step's decoupled pull uses."""
    warmup = round(spec.optim.warmup_ratio * plan.total_steps)
    factor = lr_schedule(spec.optim.scheduler, warmup, plan.total_steps)
    return [spec.optim.lr * factor(t) for t in range(plan.total_steps)]


def pulling_lrs(spec: JobSpec, plan: Plan) -> list[float]:
    """lr_t of the steps whose decoupled pull runs: every step after LP-FT's probe (the probe
    keeps the pretrained weights at θ*: there is nothing to pull)."""
    return scheduled_lrs(spec, plan)[spec.train.head_warmup_steps :]


def scheduled_lr_sum(spec: JobSpec, plan: Plan) -> float:
    """Σ_t lr_t over the run's pulling steps (κ's denominator)."""
    return math.fsum(pulling_lrs(spec, plan))


def resolve_strength(spec: JobSpec, num_examples: int) -> JobSpec:
    """With ``objective.strength`` κ: the spec with λ = κ / Σ_t lr_t over the steps that pull
    (this run's schedule: data size, batch, workers, epochs, LP-FT's probe left out), known
    before step 0. Otherwise unchanged.

    A decoupled pull of lr_t·λ > 1 in one step would move θ past θ* (the pull stops at θ*,
    so the realised strength would not be the one asked for), and at ≥ 2 farther from θ*
    than it was. Such a λ — given, or derived from a κ too large for the run's steps — is
    refused here, before any cluster work."""
    o = spec.objective
    if o.mode != "decoupled" or (o.strength is None and o.lam == 0):
        return spec
    from tether.errors import SpecError

    plan = make_plan(spec, num_examples, max(1, spec.scaling.num_workers))
    lrs = pulling_lrs(spec, plan)
    if not lrs:
        raise SpecError(
            [
                f"train.head_warmup_steps: {spec.train.head_warmup_steps} covers all "
                f"{plan.total_steps} steps of the run; nothing is left to fine-tune or anchor"
            ]
        )
    lam = o.lam
    if o.strength is not None:
        lam = o.strength / math.fsum(lrs) if o.strength > 0 else 0.0
        spec = spec.model_copy(update={"objective": o.model_copy(update={"lam": lam})})
    largest = lam * max(lrs)
    if largest > 1.0:
        given = f"strength {o.strength} gives λ = {lam:.4g}" if o.strength else f"λ = {lam:.4g}"
        raise SpecError(
            [
                f"objective: {given}, a decoupled pull of lr·λ = {largest:.3g} in one step "
                f"(over this run's {len(lrs)} pulling steps): above 1 a step would move θ past "
                "θ* (at ≥ 2 farther from θ* than it was). Lower it, or train for more steps"
            ]
        )
    return spec


@dataclass
class Setup:
    """One worker's model, anchor and optimizer state, ready for the first (or next) step."""

    model: torch.nn.Module  # as the strategy runs it (DDP-wrapped, or FSDP-sharded)
    trainable: list[torch.nn.Parameter]
    pretrained: list[torch.nn.Parameter]  # the anchored ones (all but the new head)
    anchor: Anchor | LowRankAnchor | None
    theta_star_hash: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Any
    plan: Plan
    start_step: int
    tokenizer_source: str
    tokenizer: Any  # the task's tokenizer (generation, export)


def set_up(
    spec: JobSpec, task: Task, data: PreparedData, strategy: Strategy, resume_dir: Path | None
) -> Setup:
    source = resolve_model_source(spec.model.name, spec.storage.path)
    model, new_params = build_model(spec, task, source)
    if not strategy.sharded:  # FSDP moves each rank's shards to the device itself: the whole
        model = model.to(strategy.device)  # model never has to fit one device
    if spec.train.gradient_checkpointing:
        # non-reentrant: works with DDP's no_sync, FSDP and frozen inputs
        model.gradient_checkpointing_enable({"use_reentrant": False})
    # θ*'s identity from the whole weights, before FSDP spreads them over the ranks
    theta_star_hash = theta_star_identity(spec, model, new_params)
    model = strategy.shard(model)  # FSDP: from here each rank holds its shards of θ
    anchor, anchored_names = build_objective(spec, model, new_params)
    if spec.train.head_warmup_steps and not any(
        p.requires_grad for n, p in model.named_parameters() if n not in anchored_names
    ):
        raise ValueError(
            "train.head_warmup_steps: this model has no new head to warm up (every trained "
            "parameter is pretrained); set it to 0"
        )
    optimizer = torch.optim.AdamW(
        param_groups(
            model,
            anchored_names,
            spec.optim.lr,
            spec.optim.weight_decay,
            spec.optim.new_param_lr_scale,
            decay_anchored=spec.optim.decay_anchored,
        ),
        lr=spec.optim.lr,
        betas=spec.optim.betas,
        eps=spec.optim.eps,
        # one fused kernel instead of a per-tensor loop: 127 → 9 ms per step on MiniLM, CPU
        fused=strategy.device.type in ("cpu", "cuda"),
    )
    plan = make_plan(spec, len(data.train), strategy.world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_schedule(
            spec.optim.scheduler,
            round(spec.optim.warmup_ratio * plan.total_steps),
            plan.total_steps,
        ),
    )
    precision = resolve_precision(spec.train.precision, strategy.device)
    scaler = torch.amp.GradScaler(strategy.device.type, enabled=precision == "fp16-mixed")
    start_step = 0
    if resume_dir is not None:
        state = load_training_state(
            resume_dir,
            strategy.rank,
            model,
            optimizer,
            theta_star_hash,
            strategy.device,
            sharded=strategy.sharded,
        )
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        restore_loop_state(
            load_loop_state(resume_dir, strategy.rank, strategy.device, strategy.sharded),
            anchor,
            scaler,
            strategy.rank,
        )
    return Setup(
        model=strategy.wrap(model),
        trainable=[p for p in model.parameters() if p.requires_grad],
        pretrained=[
            p for n, p in model.named_parameters() if p.requires_grad and n in anchored_names
        ],
        anchor=anchor,
        theta_star_hash=theta_star_hash,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        autocast=torch.autocast(
            strategy.device.type, dtype=_AUTOCAST[precision], enabled=precision != "fp32"
        ),
        plan=plan,
        start_step=start_step,
        tokenizer_source=source,
        tokenizer=task.load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code),
    )


def restore_loop_state(saved: dict | None, anchor, scaler, rank: int) -> None:
    """The decoupled pull's rounding carry and the fp16 loss scale, as the checkpoint left
    them, so a resumed run continues exactly as the uninterrupted one would have."""
    if saved is None:
        return
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    carry = saved.get("anchor_carry") or []
    if anchor is not None and carry and not anchor.restore_carry(carry):
        # FSDP on another worker count: the shards moved; at most one rounding step is lost
        _note(rank, "the decoupled pull's rounding carry does not fit these shards: reset")


def _note(rank: int, message: str) -> None:
    if rank == 0:
        print(f"tether: {message}", flush=True)


def build_model(spec: JobSpec, task: Task, source: str) -> tuple[torch.nn.Module, set[str]]:
    """The model as trained: the task's model on the base, frozen as asked, with its LoRA
    adapter when ``model.adapter`` is set; and the names of its new (head) parameters."""
    with new_heads_allowed():
        loaded = task.load_model(source, spec.model.revision, spec.model.trust_remote_code)
    model = loaded.model
    freeze_parameters(
        model, spec.model.freeze, spec.model.freeze_embeddings, spec.model.freeze_layers
    )
    adapter = spec.model.adapter
    if adapter is not None:
        model = apply_lora(
            model,
            loaded.new_param_names,
            adapter.r,
            adapter.alpha,
            adapter.dropout,
            adapter.target_modules,
            adapter.modules_to_save,
        )
    return model, loaded.new_param_names


def theta_star_identity(spec: JobSpec, model: torch.nn.Module, new_params: set[str]) -> str:
    """θ*'s hash: the identity a resume and a registered adapter check, of θ* as the anchor
    stores it (rounded to a half-precision ``anchor_dtype``). With LoRA θ* is the frozen base,
    so the hash covers every pretrained weight."""
    if spec.model.adapter is not None:
        return weights_hash(frozen_base(model, new_params))
    dtype = getattr(torch, spec.objective.anchor_dtype)
    return weights_hash((n, p.to(dtype)) for n, p in anchored_parameters(model, new_params))


def build_objective(
    spec: JobSpec, model: torch.nn.Module, new_params: set[str]
) -> tuple[Anchor | LowRankAnchor | None, set[str]]:
    """θ*'s anchor and the names of the anchored parameters (their optimizer group)."""
    o = spec.objective
    if spec.model.adapter is None:
        anchored = anchored_parameters(model, new_params)
        return build_anchor(anchored, o.lam, o.mode, o.anchor_dtype), {n for n, _ in anchored}
    anchor = lora_anchor(model, new_params, o.lam, o.mode, o.anchor_dtype)
    return anchor, lora_anchored_names(model, new_params)


# --------------------------------------------------------------------------- optimizer pieces


def param_groups(
    model: torch.nn.Module,
    anchored_names: set[str],
    lr: float,
    weight_decay: float,
    new_param_lr_scale: float,
    decay_anchored: bool,
) -> list[dict[str, Any]]:
    """AdamW groups: anchored parameters first (their lr drives the decoupled pull).

    Pretrained (anchorable) parameters get no decay toward zero unless ``decay_anchored``,
    at every λ: it would pull against θ*, and the λ = 0 control arm must differ from an
    anchored run only in λ. New parameters (the head) get ordinary decay and may get a
    higher lr; biases and norms never decay, as usual for transformers.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_anchored = name in anchored_names
        no_decay = p.ndim < 2 or "norm" in name.lower()
        decays = not no_decay and (decay_anchored or not is_anchored)
        groups.setdefault((is_anchored, decays), []).append(p)
    out = []
    for is_anchored, decays in sorted(groups, key=lambda k: (not k[0], not k[1])):
        scale = 1.0 if is_anchored else new_param_lr_scale
        out.append(
            {
                "params": groups[(is_anchored, decays)],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decays else 0.0,
            }
        )
    return out


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """This step's scheduled peak-relative lr (the anchored group's: it drives the pull)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group["lr_scale"]


def lr_schedule(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier on the peak lr at each step: linear warm-up, then linear/cosine/constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


# --------------------------------------------------------------------------- statistics


class TrainStats:
    """Training statistics since the last evaluation, kept on device (no sync per batch)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.units = torch.zeros((), dtype=torch.float64, device=device)
        self.examples = 0
        self.grad_norm_sum = 0.0
        self.steps = 0
        self.lr = 0.0
        self.start = time.perf_counter()

    def add_batch(self, loss_sum: torch.Tensor, units: torch.Tensor, examples: int) -> None:
        self.loss_sum += loss_sum.detach().double()
        self.units += units.double()
        self.examples += examples

    def add_step(self, grad_norm: float, lr: float) -> None:
        self.grad_norm_sum += grad_norm
        self.steps += 1
        self.lr = lr

    def summary(self, strategy: Strategy) -> dict[str, float]:
        """Means over all workers: the loss per labelled unit; samples/s counts every worker."""
        elapsed = time.perf_counter() - self.start
        examples = torch.tensor(float(self.examples), dtype=torch.float64, device=self.units.device)
        stats = strategy.all_reduce_sum(torch.stack([self.loss_sum, self.units, examples]).cpu())
        return {
            "train/fine_loss": float(stats[0] / max(float(stats[1]), 1.0)),
            "train/grad_norm": self.grad_norm_sum / max(self.steps, 1),
            "train/lr": self.lr,
            "train/samples_per_s": float(stats[2]) / max(elapsed, 1e-9),
        }
