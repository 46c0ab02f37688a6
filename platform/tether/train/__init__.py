"""The training loop and what it runs on.

inputs      WorkerInputs (what the driver hands each worker) and LoopHooks
strategy    how the loop is parallelised: DDP replicas or FSDP2 shards
setup       model, θ*, optimizer, schedule and resume, before the first step
loop        the loop itself: read it top to bottom
checkpoint  the checkpoint layout, export, retention
"""
