"""Metrics are exact under data parallelism: 2 workers (gloo) score a split exactly as 1 does.

Each worker evaluates its shard of the same weights; the task's additive counts are summed
with one all-reduce. The shards are unequal (odd sizes), as in real runs.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tether.config import validate_job

from .helpers import free_port, prepare


def _score(rank: int, world: int, port: int, spec_dict: dict, data_file: str, out: str) -> None:
    """One worker: the same weights (same seed), this rank's shard, all-reduced metrics."""
    from tether.models import resolve_model_source
    from tether.tasks import build_task
    from tether.train.loop import evaluate
    from tether.train.strategy import DataParallel

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    spec = validate_job(spec_dict)
    data = pickle.loads(Path(data_file).read_bytes())
    task = build_task(spec, data.label_names)
    torch.manual_seed(0)  # the fresh head: identical on every rank
    model = task.load_model(resolve_model_source(spec.model.name), None, False).model
    strategy = DataParallel(rank, world, torch.device("cpu"))
    metrics = evaluate(model, data.validation, task, data.pad_id, spec, strategy)
    if rank == 0:
        Path(out).write_text(json.dumps(metrics))
    if world > 1:
        dist.barrier()  # nobody leaves while a peer still talks to it (gloo aborts then)
        _done_marker(out, rank).touch()
        dist.destroy_process_group()


def _done_marker(out: str, rank: int) -> Path:
    return Path(f"{out}.rank{rank}.done")


def _spawn(args: tuple, world: int, out: str) -> None:
    """Run ``world`` workers; a crash before a rank's work is done fails the test.

    gloo can abort a process (SIGABRT, "terminate called without an active exception")
    while it tears its threads down, after every collective has finished: seen twice in
    full fresh-clone runs of the suite, never when this file runs alone. A rank that passed
    the final barrier and wrote its marker has done everything this test checks, so such
    an abort is reported as a warning, not failed on.
    """
    workers = mp.start_processes(_score, args=args, nprocs=world, join=False)
    try:
        while not workers.join(grace_period=10):  # a peer gets time to finish its marker
            pass
    except mp.ProcessExitedException as exited:
        if not all(_done_marker(out, rank).exists() for rank in range(world)):
            raise
        message = f"worker {exited.error_index} died in gloo teardown, after its work: {exited}"
        warnings.warn(message, stacklevel=2)


def scores(spec_dict: dict, data, tmp_path: Path, world: int) -> dict:
    data_file = tmp_path / "data.pkl"
    data_file.write_bytes(pickle.dumps(data))
    out = tmp_path / f"metrics{world}.json"
    args = (world, free_port(), spec_dict, str(data_file), str(out))
    if world == 1:
        _score(0, *args)
    else:
        _spawn(args, world, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "task, data, base",
    [
        (
            "sequence-classification",
            {"train": "synthetic:sentiment", "max_validation_samples": 77},
            "tiny_model_dir",
        ),
        (
            "token-classification",
            {"train": "synthetic:entities", "max_validation_samples": 83},
            "tiny_model_dir",
        ),
        ("causal-lm", {"train": "synthetic:chat", "max_validation_samples": 21}, "tiny_llama_dir"),
        (  # short windows: most contexts are split, and windows group by example
            "question-answering",
            {
                "train": "synthetic:qa",
                "max_validation_samples": 37,
                "max_length": 48,
                "doc_stride": 12,
                "max_question_length": 16,
            },
            "tiny_model_dir",
        ),
        (  # SQuAD v2.0-style: a third of the questions have no answer
            "question-answering",
            {
                "train": "synthetic:qa-v2",
                "unanswerable": True,
                "max_validation_samples": 31,
                "max_length": 48,
                "doc_stride": 12,
                "max_question_length": 16,
            },
            "tiny_model_dir",
        ),
    ],
)
def test_two_workers_score_exactly_like_one(task, data, base, request, tmp_path):
    """Every count-based metric of 2 gloo workers equals 1 worker's on the same weights; the
    loss agrees to fp32 rounding (batches pad to other widths on other shards). For QA the
    windows of one context are scored together wherever they land."""
    from tether.tasks import task_class

    tiny_model_dir = request.getfixturevalue(base)
    spec_dict = {
        "model": {"name": str(tiny_model_dir), "task": task},
        "data": {"max_train_samples": 40, "max_length": 96, **data},
        "train": {"eval_batch_size": 8},
    }
    spec = validate_job(spec_dict)
    tokenizer = task_class(task)().load_tokenizer(str(tiny_model_dir), None, False)
    _, prepared = prepare(spec, tokenizer)
    one = scores(spec_dict, prepared, tmp_path, 1)
    two = scores(spec_dict, prepared, tmp_path, 2)
    groups = prepared.validation.groups
    examples = len(prepared.validation) if groups is None else len(set(groups.tolist()))
    assert one["eval/num_examples"] == examples
    assert groups is None or len(prepared.validation) > 1.5 * examples  # contexts were split
    assert set(one) == set(two)
    for key in one:
        tolerance = 1e-6 if key in ("eval/loss", "eval/perplexity") else 1e-12
        assert two[key] == pytest.approx(one[key], rel=tolerance, abs=1e-12), key
