"""tether: anchored (L2-SP) fine-tuning of pretrained language models on Ray.

    from tether import load_job, run_training, open_sweep, run_tracked_sweep
    spec = load_job("jobs/demo.yaml", ["objective.lambda=0.1"])
    outcome = run_training(spec)

Layers, bottom to top (a module imports only from layers below it; tests/test_layers.py
checks it): errors, sources, config, card, cluster → anchor, data, models, synthetic → tasks
→ tracking → train → registry → run → sweep → serving → cli, demo, submit.
Importing ``tether`` imports none of torch, Ray or MLflow.
"""

from __future__ import annotations

__all__ = ["load_job", "JobSpec", "run_training", "open_sweep", "run_sweep", "run_tracked_sweep"]


def __getattr__(name: str):
    if name in ("load_job", "JobSpec"):
        from tether import config

        return getattr(config, name)
    if name == "run_training":
        from tether.run import run_training

        return run_training
    if name in ("open_sweep", "run_sweep", "run_tracked_sweep"):
        from tether import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
