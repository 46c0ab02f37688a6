"""Connecting to Ray, and giving the caller its signal handlers back after Ray borrowed them.

Used by training, sweeps, serving and the demo; it imports Ray only when called.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


def ensure_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Connect to a cluster (spec, RAY_ADDRESS) or start a local one; no-op if connected.

    A local cluster's dashboard binds to 127.0.0.1 (Ray's default): Ray Train's placement-group
    cleaner needs its state API, and the jobs API must never face a network unauthenticated.
    ``log_to_driver=False`` keeps workers' output in Ray's log files (a sweep prints one line
    per trial instead of every trial's progress).
    """
    import ray

    # our progress lines are plain prints: Train's print patch would log each one twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(dashboard_host="127.0.0.1", log_to_driver=log_to_driver)


@contextlib.contextmanager
def caller_signal_handlers():
    """Give the caller back its signal handlers after a Ray Train fit or a Tune run.

    Both install their own SIGINT handler in the driver for the run (Tune also SIGUSR1) and
    leave it there after a normal finish. A later Ctrl-C, e.g. in `tether demo` serving the
    winner, then only printed Tune's "Stop signal received" warning.
    """
    if threading.current_thread() is not threading.main_thread():  # Ray installs none there
        yield
        return
    signals = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
