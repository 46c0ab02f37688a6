"""Which examples go into which batch, on which worker.

Training: a ``DistributedSampler`` order per (seed, epoch), sharded so every rank gets the
same number of batches. Evaluation: disjoint shards (no padded duplicates, so counts are
exact) with the *same number of batches on every rank*; a rank with fewer examples repeats
its last batch with weight 0. FSDP needs that: every rank must run the same forward passes.
"""

from __future__ import annotations

import math

import numpy as np


def epoch_batches(
    lengths: np.ndarray,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    group_by_length: bool = False,
) -> list[np.ndarray]:
    """This rank's batches for one epoch; every rank gets the same number of batches.

    A DistributedSampler shuffles with (seed, epoch) and shards; with ``group_by_length``
    each chunk of 50 batches is sorted by length so batches pad less, and the batches are then
    shuffled so long and short ones interleave.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(len(lengths)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)  # a new order every epoch, identical across ranks
    order = np.fromiter(sampler, dtype=np.int64)
    if group_by_length:
        chunk = batch_size * 50
        parts = [order[i : i + chunk] for i in range(0, len(order), chunk)]
        order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng = np.random.default_rng([seed, epoch, rank])
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world: int) -> int:
    """Optimizer steps in one epoch, counted as the loop counts them (every rank agrees)."""
    per_rank = math.ceil(num_examples / max(1, world))  # DistributedSampler pads to this
    return math.ceil(math.ceil(per_rank / batch_size) / grad_accum)


def eval_batches(
    lengths: np.ndarray, batch_size: int, rank: int, world: int, groups: np.ndarray | None = None
) -> list[tuple[np.ndarray, bool]]:
    """(indices, counts) pairs for this rank's share of a split: equal batch counts per rank.

    The shard is every world-th example, sorted by length (similar lengths pad less). Ranks
    whose shard is shorter repeat their last batch with ``counts=False``: its forward pass
    runs, its statistics are dropped.

    ``groups`` (a group id per row) keeps rows that are scored together in one batch on one
    rank: the windows of one long question-answering context. Groups are sharded instead of
    rows, and a batch holds whole groups (one group larger than ``batch_size`` gets a batch
    of its own), so a task's counts per group stay additive.
    """
    if groups is None:
        per_rank = [_row_batches(lengths, batch_size, r, world) for r in range(world)]
    else:
        per_rank = [_group_batches(lengths, groups, batch_size, r, world) for r in range(world)]
    batches = [(b, True) for b in per_rank[rank]]
    most = max((len(b) for b in per_rank), default=0)
    filler = batches[-1][0] if batches else np.arange(min(1, len(lengths)))
    while len(batches) < most and len(filler):
        batches.append((filler, False))
    return batches


def _row_batches(lengths: np.ndarray, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    mine = np.arange(rank, len(lengths), world)
    mine = mine[np.argsort(lengths[mine], kind="stable")]
    return [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]


def group_rows(groups: np.ndarray) -> list[np.ndarray]:
    """The rows of each group (sorted), groups in order of first appearance."""
    order = np.argsort(groups, kind="stable")
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    parts = np.split(order, cuts) if len(order) else []
    return sorted(parts, key=lambda rows: int(rows[0]))


def _group_batches(
    lengths: np.ndarray, groups: np.ndarray, batch_size: int, rank: int, world: int
) -> list[np.ndarray]:
    rows = group_rows(groups)[rank::world]
    rows.sort(key=lambda r: int(lengths[r].max()))  # similar lengths pad less
    batches: list[list[np.ndarray]] = []
    for r in rows:
        if batches and sum(len(x) for x in batches[-1]) + len(r) <= batch_size:
            batches[-1].append(r)
        else:
            batches.append([r])
    return [np.concatenate(b) for b in batches]
