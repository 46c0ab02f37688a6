"""Turn serving options into a Serve config and apply it to the cluster.

    options = ServeOptions(port=8000, max_batch_size=16)
    config = serve_config(options, model_user_config(resolve_model_dir("runs/demo/model")))
    deploy(config)                      # starts Serve if needed; waits until RUNNING
    deploy(config_with_new_user_config) # hot swap: replicas call reconfigure(), no restart

``tether serve`` and ``serve deploy serve/config.yaml`` deploy the same thing: the config
``serve_config`` returns has the shape of serve/config.yaml.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.errors import DeployError

__all__ = ["DeployError", "ServeOptions", "deploy", "serve_config", "model_user_config"]

APP_NAME = "tether"
IMPORT_PATH = "tether.serving.app:app_builder"
DEPLOYMENT_NAME = "TetherServer"  # the replica class tether.serving.app builds


@dataclass
class ServeOptions:
    """Infrastructure settings of one serving application (CLI flags map one to one)."""

    task: str = "sequence-classification"  # what the served model does (from its card)
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    num_cpus: float = 1.0  # per replica; also its torch threads
    max_batch_size: int = 16  # texts per forward pass
    batch_wait_ms: float = 5.0
    max_texts: int = 64  # items (texts, sentences) per request
    max_chars: int = 20_000  # characters per text
    max_body_bytes: int = 1_000_000
    max_json_depth: int = 32
    max_ongoing_requests: int | None = None  # per replica; default 2 × max_batch_size
    max_queued_requests: int = 64  # per proxy; beyond it requests get 503 at once
    request_timeout_s: float = 30.0  # the whole HTTP request (a streamed answer too)
    max_new_tokens: int = 512  # generation: the largest max_tokens a request may ask
    max_waiting: int = 64  # generation: requests waiting for a batch slot (503 beyond)
    generation_timeout_s: float = 120.0  # generation: decoding time per request
    max_adapters: int = 8  # generation: LoRA adapters held per replica (LRU)
    text_pair: bool = False  # a sentence-pair classifier (from its card)
    api_key_sha256: str | None = None
    app_name: str = APP_NAME
    route_prefix: str = "/"
    extra_args: dict[str, Any] = field(default_factory=dict)  # more AppArgs (tests)

    def __post_init__(self):
        problems = []
        for name in (
            "port",
            "replicas",
            "max_batch_size",
            "max_texts",
            "max_chars",
            "max_body_bytes",
            "max_json_depth",
            "max_adapters",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                problems.append(f"autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")
        if self.num_cpus <= 0:
            problems.append(f"num_cpus must be > 0, got {self.num_cpus}")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            problems.append("batch_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            problems.append("max_queued_requests must be >= 1 (or -1: unbounded)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def ongoing_per_replica(self) -> int:
        # a full batch computing plus the next one filling
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # where a local client reaches a wildcard bind
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def model_user_config(
    model_dir: Path,
    model_uri: str | None = None,
    quantize: bool = False,
    tracking_uri: str | None = None,
) -> dict:
    """The replica's user_config: changing it hot-swaps the model in place.

    A registry URI is pinned to the version that was downloaded into ``model_dir`` (its card
    records it: ``models:/demo/3``), so replicas started later load the same weights even
    after the alias moves; the tracking URI goes along, so a replica on another node fetches
    from the same registry. The weights hash makes a retrained model in the same directory a
    change, and lets a replica check its copy.
    """
    from tether.card import read_card
    from tether.config import resolve_tracking_uri
    from tether.serving.model import weights_sha256

    alias = None
    if model_uri:
        tracking_uri = resolve_tracking_uri(tracking_uri)
        identity = read_card(Path(model_dir)).get("registry")
        if identity:
            alias = identity.get("alias")
            model_uri = f"models:/{identity['name']}/{identity['version']}"
    return {
        "model_dir": str(model_dir),
        "model_uri": model_uri,
        "weights_sha256": weights_sha256(Path(model_dir)),
        "quantize": quantize,
        "tracking_uri": tracking_uri if model_uri else None,
        "alias": alias,
    }


def application_config(options: ServeOptions, user_config: dict[str, Any]) -> dict[str, Any]:
    """One entry of the config's ``applications:`` list (schema of serve/config.yaml)."""
    args = {
        "task": options.task,
        "max_batch_size": options.max_batch_size,
        "batch_wait_ms": options.batch_wait_ms,
        "max_texts": options.max_texts,
        "max_chars": options.max_chars,
        "max_body_bytes": options.max_body_bytes,
        "max_json_depth": options.max_json_depth,
        "max_new_tokens": options.max_new_tokens,
        "max_waiting": options.max_waiting,
        "request_timeout_s": options.generation_timeout_s,
        "max_adapters": options.max_adapters,
        "api_key_sha256": options.api_key_sha256,
        **({"text_pair": True} if options.text_pair else {}),
        **options.extra_args,
    }
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": options.ongoing_per_replica,
        "max_queued_requests": options.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "ray_actor_options": {"num_cpus": options.num_cpus},
        "user_config": user_config,
    }
    if options.autoscale is not None:
        deployment["autoscaling_config"] = {
            "min_replicas": options.autoscale[0],
            "max_replicas": options.autoscale[1],
            # scale out when replicas hold a full batch each on average
            "target_ongoing_requests": options.max_batch_size,
        }
    else:
        deployment["num_replicas"] = options.replicas
    return {
        "name": options.app_name,
        "route_prefix": options.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [deployment],
    }


def serve_config(options: ServeOptions, user_config: dict[str, Any]) -> dict[str, Any]:
    """A whole Serve config (``serve deploy`` format) with one tether application."""
    return {
        "http_options": http_options(options),
        "applications": [application_config(options, user_config)],
    }


def http_options(options: ServeOptions) -> dict[str, Any]:
    return {
        "host": options.host,
        "port": options.port,
        "request_timeout_s": options.request_timeout_s,
    }


# --------------------------------------------------------------------------- applying


def deploy(config: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Apply ``config`` declaratively (starting Serve if needed); wait until it is RUNNING.

    Declarative, like ``serve deploy``: the code version is a hash of import_path and args,
    so a change of user_config alone calls reconfigure() on the running replicas.
    ``serve.run`` would give every deploy a new random code version and restart them.
    Serve deletes declaratively deployed apps absent from ``config``: refused here instead.
    """
    from ray.serve._private.api import serve_start  # the client `serve deploy` reaches via REST
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    names = [app.name for app in schema.applications]
    client = serve_start(http_options=config.get("http_options"))
    refuse_other_address(client, config.get("http_options") or {})
    refuse_to_delete_other_apps(names)
    client.deploy_apps(schema)
    wait_until_running(names, timeout_s)


def refuse_other_address(client, wanted: dict[str, Any]) -> None:
    """A running Serve keeps its HTTP address (Ray only logs a warning): say so instead of
    printing an address nothing listens on."""
    actual = client.http_config
    for key in ("host", "port"):
        if key in wanted and getattr(actual, key, wanted[key]) != wanted[key]:
            raise DeployError(
                f"Serve is already running on this cluster at {actual.host}:{actual.port}; it "
                f"cannot also listen on {wanted.get('host')}:{wanted.get('port')}. Use that "
                "address, or `serve shutdown` first (or another cluster)"
            )


def refuse_to_delete_other_apps(names: list[str]) -> None:
    """A declarative deploy deletes the declarative apps it does not list: never do it silently."""
    from ray import serve

    others = sorted(set(serve.status().applications) - set(names))
    if others:
        raise DeployError(
            f"Serve on this cluster also runs {others}, which this deploy could delete: "
            "deploy them in one config with it, or use another cluster"
        )


def wait_until_running(app_names: list[str], timeout_s: float) -> None:
    """Poll serve.status() until every app is RUNNING; raise DeployError on DEPLOY_FAILED."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status if name in apps else "MISSING" for name in app_names}
        failed = [name for name, state in states.items() if state == "DEPLOY_FAILED"]
        if failed:
            raise DeployError(f"{failed[0]}: {apps[failed[0]].message.strip()}")
        if all(state == "RUNNING" for state in states.values()):
            return
        if time.monotonic() > deadline:
            raise DeployError(f"not RUNNING after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)
