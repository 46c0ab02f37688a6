"""Serving trained models over HTTP with Ray Serve (``tether serve``).

    model    where a model comes from, loading, batched classification (no Ray)
    contract the HTTP request contract: limits, validation, error bodies (no Ray)
    app      the Serve application: FastAPI ingress + batching replica + app_builder
    deploy   options → Serve config (the shape of serve/config.yaml) → applied, hot swaps
    cli      the `tether serve` command

Imports point one way: cli → deploy → model; app → contract, model. Nothing here is imported
by training code, and importing this package imports neither Ray nor torch.
"""
