"""The training loop: anchored fine-tuning, run by Ray Train on every worker.

Read it top to bottom. Each optimizer step is

    fine_loss = Σ L_fine(θ; batch) / units      # summed over the step's labelled units (examples,
                                                # tags, target tokens) on every worker
    grad += 2λ(θ − θ*)                          # coupled anchor, once per optimizer step
    clip; optimizer.step()                      # AdamW
    θ ← θ − lr·λ(θ − θ*)                        # decoupled anchor (the other mode)

Every ``eval_interval`` steps the full validation set is scored (sharded over workers, additive
counts all-reduced), the metrics are reported to Ray Train with a checkpoint, and rank 0
prints one progress line. After a worker failure Ray restarts the group and the loop resumes
from ``ray.train.get_checkpoint()``; in local mode from the run folder's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tether.anchor import (
    add_anchor_grad_,
    drift_report,
    local_part,
    num_anchored_tensors,
    pull_toward_anchor_,
    weights_hash,
)
from tether.config import JobSpec
from tether.data import Encoded, PreparedData, epoch_batches, eval_batches
from tether.tasks import Task, build_task
from tether.tracking import Tracker, make_tracker
from tether.train.checkpoint import (
    HF_MODEL_DIR,
    checkpoint_name,
    export_hf_model,
    model_card,
    prune_checkpoints,
    save_training_state,
)
from tether.train.inputs import WorkerInputs
from tether.train.setup import (
    Setup,
    TrainStats,
    base_lr,
    build_model,
    resolve_precision,
    resolve_strength,
    set_up,
)
from tether.train.strategy import Strategy, make_strategy


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is {"inputs": WorkerInputs}."""
    import ray.train
    import ray.train.torch

    inputs: WorkerInputs = config["inputs"]
    data: PreparedData = _resolve_data_ref(inputs.data)
    # the job as written; λ from its strength κ exactly as the driver derived it
    spec = resolve_strength(JobSpec.model_validate(inputs.job), len(data.train))
    if not inputs.verbose:
        _quiet_libraries()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    strategy = make_strategy(
        spec.scaling.strategy,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        device,
        resolve_precision(spec.train.precision, device),
    )
    torch.set_num_threads(spec.train.num_threads or max(1, int(spec.scaling.cpus_per_worker)))
    # the same new head on every rank: FSDP keeps each rank's own slice of it (DDP would
    # broadcast rank 0's anyway)
    torch.manual_seed(spec.train.seed)
    task = build_task(spec, data.label_names)
    with _resume_dir(inputs) as resume_dir:
        run = set_up(spec, task, data, strategy, resume_dir)
    if run.start_step:
        _print0(strategy.rank, f"resumed from {resume_dir.name} at step {run.start_step}")
    tracker = make_tracker(inputs.tracking, strategy.rank)  # MLflow on rank 0, else a no-op
    train(run, spec, task, data, strategy, tracker, inputs)


def train(
    run: Setup,
    spec: JobSpec,
    task: Task,
    data: PreparedData,
    strategy: Strategy,
    tracker: Tracker,
    inputs: WorkerInputs,
) -> None:
    """Steps from ``run.start_step`` to the end, evaluating and checkpointing on the plan."""
    plan, accum = run.plan, spec.train.grad_accum_steps
    step = run.start_step
    stats = TrainStats(strategy.device)
    while step < plan.total_steps:
        epoch = step // plan.steps_per_epoch
        batches = epoch_batches(
            data.train.lengths,
            spec.train.batch_size,
            epoch,
            spec.train.seed,
            strategy.rank,
            strategy.world,
            spec.data.group_by_length,
        )
        done_in_epoch = (step % plan.steps_per_epoch) * accum
        for start in range(done_in_epoch, len(batches), accum):
            probing = step < spec.train.head_warmup_steps  # LP-FT: the new head alone first
            if step == spec.train.head_warmup_steps > 0:
                _print0(strategy.rank, f"step {step}: head warm-up done, fine-tuning everything")
            grad_norm, lr = optimizer_step(
                run, spec, task, data, strategy, batches[start : start + accum], stats, probing
            )
            step += 1
            stats.add_step(grad_norm, lr)
            if inputs.hooks is not None:
                inputs.hooks.after_step(step, strategy.rank, strategy.world)
            if plan.is_eval_step(step):
                metrics = stats.summary(strategy) | drift_metrics(run)
                metrics |= evaluate(
                    run.model, data.validation, task, data.pad_id, spec, strategy, run.autocast
                )
                metrics |= extra_evaluation(run, task, data, spec, strategy, tracker, step)
                metrics |= {
                    "step": step,
                    "train/phase": 0.0 if step <= spec.train.head_warmup_steps else 1.0,
                    "epoch": step / plan.steps_per_epoch,
                    "total_steps": plan.total_steps,
                    "resumed_from_step": run.start_step,
                }
                tracker.log_metrics(metrics, step)
                metrics["tracking_errors"] = tracker.errors
                _print0(strategy.rank, progress_line(metrics, task.primary_metric))
                report(metrics, run, spec, task, strategy, inputs, final=step == plan.total_steps)
                stats = TrainStats(strategy.device)
            if step >= plan.total_steps:
                break


def optimizer_step(
    run: Setup,
    spec: JobSpec,
    task: Task,
    data: PreparedData,
    strategy: Strategy,
    micro_batches: list,
    stats: TrainStats,
    probing: bool = False,
) -> tuple[float, float]:
    """One optimizer step over ``micro_batches``; returns (grad norm, lr).

    ``probing`` (LP-FT's first phase): only the new head moves; the pretrained parameters
    keep θ* (their gradients are dropped, so AdamW leaves them and their state alone)."""
    model, optimizer, scaler, anchor = run.model, run.optimizer, run.scaler, run.anchor
    model.train()
    units = torch.zeros((), dtype=torch.float64, device=strategy.device)
    for i, indices in enumerate(micro_batches):
        batch = _to(data.train.collate(indices, data.pad_id), strategy.device)
        last = i == len(micro_batches) - 1
        # only the last micro-batch needs to all-reduce (DDP) / reduce-scatter (FSDP) gradients
        with strategy.no_sync(model, enabled=not last):
            with run.autocast:
                fine_loss_sum, n = task.loss(model, batch)
            scaler.scale(fine_loss_sum).backward()
        units += n
        stats.add_batch(fine_loss_sum, n, len(indices))

    scaler.unscale_(optimizer)
    # DDP/FSDP averaged the workers' summed gradients: make it the mean over all labelled units
    total_units = float(strategy.all_reduce_sum(units.cpu()))
    scale_gradients_(run.trainable, strategy.world / max(total_units, 1.0))
    if probing:
        for p in run.pretrained:
            p.grad = None
        anchor = None  # θ = θ* for every anchored parameter: the term is zero
    grad_norm = anchored_clipped_gradient_(
        run.trainable, anchor, spec.optim.max_grad_norm, spec.objective.clip, strategy
    )
    lr = base_lr(optimizer)
    if scaled_optimizer_step(scaler, optimizer):  # AdamW
        pull_toward_anchor_(anchor, lr)  # θ ← θ − lr·λ(θ − θ*)
        run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def anchored_clipped_gradient_(
    params: list[torch.Tensor], anchor, max_norm: float | None, order: str, strategy: Strategy
) -> float:
    """The step's gradient: the data's, plus the coupled anchor's 2λ(θ − θ*), clipped.

    ``total`` clips the sum, so a large anchor term also shrinks the data's gradient;
    ``fine_only`` clips the data's gradient alone and adds the anchor's after, in full.
    Returns the norm before clipping (of the sum, or of the data's gradient)."""
    if order == "fine_only":
        grad_norm = strategy.clip_grad_norm_(params, max_norm)
        add_anchor_grad_(anchor)
        return grad_norm
    add_anchor_grad_(anchor)  # + 2λ(θ − θ*), exact, once per step
    return strategy.clip_grad_norm_(params, max_norm)


@torch.no_grad()
def scale_gradients_(params: list[torch.Tensor], factor: float) -> None:
    grads = [local_part(p.grad) for p in params if p.grad is not None]
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)


def scaled_optimizer_step(scaler: torch.amp.GradScaler, optimizer) -> bool:
    """optimizer.step() through the loss scaler; False when fp16 overflow skipped the step
    (then neither the decoupled pull nor the schedule may advance)."""
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before  # a skipped step backs the scale off


# --------------------------------------------------------------------------- evaluation


def drift_metrics(run: Setup) -> dict[str, float]:
    """The anchor's drift and penalty (every rank calls it: FSDP all-reduces the sums), and
    the bytes θ* takes on this rank (1/world of the total under FSDP)."""
    report = drift_report(run.anchor)
    out = {("train/" + k if not k.startswith("drift/") else k): v for k, v in report.items()}
    return out | {"train/anchor_bytes": float(run.anchor.num_bytes if run.anchor else 0)}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Encoded,
    task: Task,
    pad_id: int,
    spec: JobSpec,
    strategy: Strategy,
    autocast=None,
) -> dict[str, float]:
    """The task's metrics over the *whole* split.

    Each rank scores a disjoint shard with the same number of batches, and the task's
    additive counts are summed across ranks with one all-reduce, so the metrics are exact.
    """
    net = strategy.unwrap(model)
    net.eval()
    counts = score_split(
        net, split, task.eval_counts, task.num_counts(), pad_id, spec, strategy, autocast
    )
    return task.eval_metrics(counts)


def score_split(
    model, split: Encoded, counts_fn, size: int, pad_id: int, spec, strategy, autocast=None
) -> torch.Tensor:
    """``counts_fn``'s additive counts over the whole split, summed over all workers."""
    total = torch.zeros(size, dtype=torch.float64)
    for indices, counted in eval_batches(
        split.lengths, spec.train.eval_batch_size, strategy.rank, strategy.world, split.groups
    ):
        batch = _to(split.collate(indices, pad_id), strategy.device)
        with autocast if autocast is not None else contextlib.nullcontext():
            counts = counts_fn(model, batch)
        if counted:
            total += counts
    return strategy.all_reduce_sum(total)


def extra_evaluation(
    run: Setup, task: Task, data: PreparedData, spec, strategy, tracker, step: int
) -> dict[str, float]:
    """The task's metrics beyond the validation counts (forgetting, exact match), and a few
    generated samples logged by rank 0."""
    net = strategy.unwrap(run.model)
    net.eval()

    def score(split: Encoded, counts_fn, size: int) -> torch.Tensor:
        return score_split(net, split, counts_fn, size, data.pad_id, spec, strategy, run.autocast)

    with torch.no_grad():
        metrics = task.extra_metrics(net, run.tokenizer, data, score)
        # a sharded model computes only with every rank: all generate, rank 0 logs
        if spec.eval.samples and (strategy.rank == 0 or strategy.sharded):
            rows = task.samples(net, run.tokenizer, data.validation, spec.eval.samples)
            if rows and strategy.rank == 0:
                tracker.log_table(
                    [r | {"step": step} for r in rows], f"samples/step_{step:06d}.json"
                )
    return metrics


def progress_line(m: dict[str, float], primary: str) -> str:
    """The objective's terms, then every headline metric the task reported (primary first;
    not per-type breakdowns like eval/f1/PER, nor counts), then throughput."""
    line = (
        f"step {m['step']:>6}/{m['total_steps']} | epoch {m['epoch']:.2f} | "
        f"fine_loss {m['train/fine_loss']:.4f} | anchor_loss {m['train/anchor_loss']:.4g}"
    )
    if "train/drift_l2" in m:  # at λ = 0 θ* is not kept, so there is no drift to report
        line += f" | drift {m['train/drift_l2']:.4f}"
    headline = sorted(
        k
        for k in m
        if k.startswith("eval/") and k.count("/") == 1 and k != primary and not _is_count(k)
    )
    for key in ([primary] if primary in m else []) + headline:
        line += f" | {key.removeprefix('eval/')} {m[key]:.4f}"
    return line + f" | {m['train/samples_per_s']:.1f} samples/s"


def _is_count(key: str) -> bool:
    """How much was evaluated (eval/num_examples, eval/target_tokens), not how well."""
    return key.startswith("eval/num_") or key.endswith("_tokens")


# --------------------------------------------------------------------------- checkpoint + report


def report(
    metrics: dict[str, float],
    run: Setup,
    spec: JobSpec,
    task: Task,
    strategy: Strategy,
    inputs: WorkerInputs,
    final: bool,
) -> None:
    """Every rank writes its share of a checkpoint (rank 0: weights/optimizer; all: RNG) and
    reports it with the metrics; the final one also holds the exported model."""
    import ray.train

    net = strategy.unwrap(run.model)
    # DDP replicas must never diverge: compare the weights' hashes across ranks
    # only what trains can diverge (a LoRA run's frozen base cannot); one worker has no peer,
    # and FSDP's ranks hold different shards, not replicas
    trained = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    digest = weights_hash(trained) if strategy.world > 1 and not strategy.sharded else None
    if digest is not None and not strategy.replicas_agree(digest):
        raise RuntimeError(f"step {metrics['step']}: DDP replicas hold different weights")
    anchor_identity = {
        "base_model": spec.model.name,
        "theta_star_sha256": run.theta_star_hash,
        "lambda": spec.objective.lam,
        "mode": spec.objective.mode,
        "strength": spec.objective.strength,  # κ when λ was derived from it
        "clip": spec.objective.clip,
        "num_anchored_tensors": num_anchored_tensors(run.anchor),
        # a LoRA run's lineage: the adapter needs exactly this base (θ*) to mean anything
        "adapter": spec.model.adapter.model_dump() if spec.model.adapter else None,
    }
    state = {
        "step": metrics["step"],
        "scheduler": run.scheduler.state_dict(),
        "metrics": metrics,
        "anchor": anchor_identity,
        "world_size": strategy.world,
        "strategy": spec.scaling.strategy,
        "weights_sha256": digest,  # every rank's, compared above; each also writes its own
    }
    name = checkpoint_name(metrics["step"])
    if inputs.local:  # no Ray storage copies it: write it where it stays, in the run folder
        directory = Path(inputs.run_dir) / name
    else:
        directory = Path(tempfile.mkdtemp(prefix="tether-ckpt-"))
    worker = worker_identity() | {"weights_sha256": digest}
    loop_state = {
        "anchor_carry": run.anchor.carry() if run.anchor is not None else [],
        "scaler": run.scaler.state_dict(),  # the fp16 loss scale reached ({} when unused)
    }
    save_training_state(
        directory, strategy.rank, net, run.optimizer, state, worker, strategy.sharded, loop_state
    )
    if final:  # FSDP gathers the whole model to rank 0 first (every rank takes part)
        whole = strategy.full_model(net, lambda: build_model(spec, task, run.tokenizer_source)[0])
        if whole is not None:
            tokenizer = task.load_tokenizer(
                run.tokenizer_source, spec.model.revision, spec.model.trust_remote_code
            )
            card = model_card(spec.name, task.card(), task, anchor_identity, metrics)
            export_hf_model(whole, tokenizer, spec.to_dict(), card, directory / HF_MODEL_DIR)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
        checkpoint_dir_name=name,
    )
    if inputs.local and strategy.rank == 0:
        prune_checkpoints(
            Path(inputs.run_dir),
            spec.train.keep_checkpoints,
            inputs.score_metric or task.primary_metric,
            inputs.score_mode or task.mode,
        )
    elif not inputs.local:  # Ray has copied it to run storage
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def _resume_dir(inputs: WorkerInputs):
    """The checkpoint folder to continue from: Ray's after a failure, or (local mode) the
    run folder's latest; None for a fresh start."""
    import ray.train

    if inputs.local:
        yield Path(inputs.resume_from) if inputs.resume_from else None
        return
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def worker_identity() -> dict[str, Any]:
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node, "host": socket.gethostname(), "pid": os.getpid()}


def _resolve_data_ref(data):
    """The prepared data arrives inline (local mode) or as an object-store reference."""
    if isinstance(data, PreparedData):
        return data
    import ray

    return ray.get(data)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _quiet_libraries() -> None:
    """Keep library INFO lines and HF progress bars from burying our progress lines."""
    import importlib.util
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("ray.train.torch").setLevel(logging.WARNING)  # "Moving model to device"
    # local mode logs every report ("Reported metrics: {...}") at INFO
    logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)
    # Train V2 logs every report ("Reporting training result ...", the whole metrics dict) at
    # INFO on a logger named by its file path, outside the "ray" hierarchy
    context = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if context is not None and context.origin:
        logging.getLogger(context.origin).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()


def _print0(rank: int, line: str) -> None:
    if rank == 0:
        print(f"[tether] {line}", flush=True)
