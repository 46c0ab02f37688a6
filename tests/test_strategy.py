"""The data-parallel strategy's collective checks, on a real two-process gloo group."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .helpers import free_port


def _agree(rank: int, port: int, digests: list[str], out) -> None:
    from tether.train.strategy import DataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        out.put((rank, DataParallel(rank, 2, torch.device("cpu")).replicas_agree(digests[rank])))
    finally:
        dist.destroy_process_group()


def replicas_agree_on(digests: list[str]) -> dict[int, bool]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_agree, args=(r, port, digests, out), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return dict(out.get(timeout=60) for _ in procs)
    finally:  # a rank that failed must not leave its peer waiting for the session's end
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def test_replicas_that_diverged_are_caught_on_every_rank():
    """Equal weight hashes agree; one differing rank makes every rank see the divergence."""
    same = "ab" * 32
    assert replicas_agree_on([same, same]) == {0: True, 1: True}
    assert replicas_agree_on([same, "cd" * 32]) == {0: False, 1: False}
