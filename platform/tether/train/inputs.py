"""What the driver hands each Train worker, and the hooks tests use to reach into the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class LoopHooks(Protocol):
    """Called by every worker after each optimizer step (tests inject faults here)."""

    def after_step(self, step: int, rank: int, world: int) -> None: ...


@dataclass(frozen=True)
class WorkerInputs:
    """Everything ``train_loop_per_worker`` needs, as plain values (it must pickle)."""

    job: dict[str, Any]  # the resolved spec (JobSpec.to_dict())
    data: Any  # PreparedData inline (local mode) or its object-store reference
    run_name: str
    run_dir: str  # where the run's checkpoints live (local mode writes them there)
    local: bool = False  # num_workers = 0: the loop runs in the driver process
    verbose: bool = False
    tracking: dict[str, Any] | None = None  # {"uri", "run_id"}: rank 0 logs curves there
    score_metric: str | None = None  # ranks checkpoints (default: the task's primary metric)
    score_mode: str | None = None
    resume_from: str | None = None  # local mode: the checkpoint folder to continue from
    hooks: LoopHooks | None = None
