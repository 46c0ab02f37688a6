"""Models in MLflow: logging, registration, and the gated `champion` alias.

A trained model folder (HF format + tether.json) is logged as an MLflow pyfunc model whose
artifact *is* that folder, so weights stay safetensors and serving can use the folder directly
(``fetch_model_dir``). ``mlflow.pyfunc.load_model(uri).predict(df)`` runs the task's own
predictor (``tether.registry.pyfunc``).

The gate compares a challenger with the champion on the same validation data and in the
metric's direction (max for accuracy/F1, min for losses). A non-finite metric (a diverged
run) is registered but never becomes champion, and a non-finite champion loses to any finite
challenger. Re-scoring a champion validated on other data is the caller's
(``evaluate_champion``): the registry does not know how to train or evaluate.

Only load models your own platform registered: loading an MLflow model unpickles its wrapper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.card import read_card, write_card
from tether.config import resolve_tracking_uri
from tether.tracking import active_tracking_uri

HF_ARTIFACT = "hf_model"  # the artifact key of the HF folder (also in registry.pyfunc)
CHAMPION, CHALLENGER = "champion", "challenger"


def log_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log the folder as the run's pyfunc model; returns its URI (MLflow 3: models:/m-...)."""
    import mlflow
    from mlflow.models import infer_signature

    from tether.registry.pyfunc import TetherModel, example_frame

    example, output = example_frame(Path(model_dir))
    with active_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TetherModel(),
            artifacts={HF_ARTIFACT: str(model_dir)},
            signature=infer_signature(example, output),
            input_example=example,
            # tether travels with the model as code (it is not a package on a public index:
            # a requirement named "tether" would install whatever owns that name there)
            code_paths=[str(Path(__file__).resolve().parents[1])],
            pip_requirements=pinned_requirements(),
        )
    return info.model_uri


RUNTIME = ("torch", "transformers", "tokenizers", "safetensors", "pandas", "pydantic", "numpy")


def pinned_requirements() -> list[str]:
    """The libraries tether's code needs at load time, pinned to what trained the model."""
    from importlib import metadata

    out = []
    for name in RUNTIME:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version.split('+')[0]}")  # a local build tag does not resolve
    return out


# --------------------------------------------------------------------------- registry


@dataclass
class GateDecision:
    name: str
    version: str
    metric: str
    mode: str
    challenger_value: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    overtaken_by: str | None = None  # a better challenger gated at the same time holds it

    def describe(self) -> str:
        if not math.isfinite(self.challenger_value):
            held = f"v{self.champion_version}" if self.champion_version else "none"
            return (
                f"{self.name} v{self.version} is not gated: its {self.metric} is "
                f"{self.challenger_value} (not a finite number); registered as challenger, "
                f"champion stays ({held})"
            )
        if self.overtaken_by is not None:
            return (
                f"{self.name} v{self.version} beat the champion it saw "
                f"({self.metric} {self.challenger_value:.4f}), but v{self.overtaken_by}, gated "
                "at the same time, is better: champion is v" + self.overtaken_by
            )
        if self.champion_version is None:
            return (
                f"{self.name} v{self.version} becomes champion: no champion yet "
                f"({self.metric} {self.challenger_value:.4f})"
            )
        verb = "beats" if self.promoted else "does not beat"
        rule = f"{'higher' if self.mode == 'max' else 'lower'} is better"
        if not math.isfinite(self.champion_value):
            rule = "any finite value beats a non-finite champion"
        return (
            f"{self.name} v{self.version} {verb} champion v{self.champion_version}: "
            f"{self.metric} {self.challenger_value:.4f} vs {self.champion_value:.4f} "
            f"({rule})" + ("; champion moved" if self.promoted else "; champion stays")
        )


def better(value: float, than: float, mode: str) -> bool:
    """Whether ``value`` beats ``than``. A non-finite value never wins; a NaN or infinite
    champion loses to any finite value (every comparison with NaN is False: it would hold
    the alias forever)."""
    if not math.isfinite(value):
        return False
    if not math.isfinite(than):
        return True
    return value > than if mode == "max" else value < than


def register_version(client, model_uri: str, name: str, run_id: str, tags: dict[str, Any]) -> str:
    """Register a complete logged model as a new version (never a half-written one)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # MLflow has no get-or-create: it already exists
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
    )
    return str(version.version)


def gate_champion(
    client,
    name: str,
    version: str,
    metric: str,
    mode: str,
    value: float,
    data_fingerprint: str,
    evaluate_champion: Callable[[str], float] | None = None,
) -> GateDecision:
    """Set `challenger` to the new version; move `champion` only if it is better.

    The comparison is on the same validation data: the champion's recorded metric is used when
    its validation fingerprint matches, otherwise ``evaluate_champion(model_uri)`` re-scores it.
    """
    from mlflow.exceptions import MlflowException

    set_alias(client, name, CHALLENGER, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None:
        refuse_incomparable(client, name, version, champion)
    if not math.isfinite(value):
        # a diverged run (NaN loss) is kept as challenger for inspection, never promoted
        held = None if champion is None else str(champion.version)
        decision = GateDecision(name, version, metric, mode, value, held, None, False)
    elif champion is None:
        decision = GateDecision(name, version, metric, mode, value, None, None, True)
    else:
        champ_value = _champion_value(champion, metric, data_fingerprint, evaluate_champion, name)
        decision = GateDecision(
            name,
            version,
            metric,
            mode,
            value,
            str(champion.version),
            champ_value,
            better(value, champ_value, mode),
        )
    if decision.promoted:
        # it beat the champion it saw: a candidate, and the best candidate takes the alias
        client.set_model_version_tag(name, version, PROMOTABLE, "true")
        holder = settle_champion(client, name, metric, mode, data_fingerprint)
        if holder is not None and holder != version:
            decision = dataclasses.replace(decision, promoted=False, overtaken_by=holder)
    client.set_model_version_tag(name, version, "tether.gate", decision.describe())
    client.update_model_version(name, version, description=decision.describe())
    return decision


def promote_by_hand(client, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` on a person's say-so (a rollback, say).

    For the champion, the versions that beat earlier champions stop being candidates: the next
    gate must not hand the alias back to the version the person just moved it away from.
    """
    client.get_model_version(name, version)  # a missing version fails here, naming it
    if alias == CHAMPION:  # first, so a gate settling meanwhile finds no candidate to restore
        for mv in client.search_model_versions(f"name='{name}'"):
            if str(mv.version) != str(version) and (mv.tags or {}).get(PROMOTABLE) == "true":
                client.set_model_version_tag(name, str(mv.version), PROMOTABLE, "false")
    set_alias(client, name, alias, version)
    client.set_model_version_tag(name, version, "tether.gate", f"promoted to {alias} by hand")


PROMOTABLE = "tether.promotable"


def settle_champion(
    client, name: str, metric: str, mode: str, fingerprint: str, rounds: int = 5
) -> str | None:
    """Point `champion` at the best promotable version scored on the same data; re-check.

    Two registrations at once can each beat the champion they read (A 0.85 and B 0.83 over
    0.80) and move the alias in either order. Each one, after writing, recomputes the best
    candidate from the registry and corrects the alias until it holds the best: the last
    writer always verifies after its write, so the alias settles on A whatever the order.
    The registry itself is the shared state, so this holds across nodes.
    """
    from mlflow.exceptions import MlflowException

    best = None
    for _ in range(rounds):
        best = best_candidate(client, name, metric, mode, fingerprint)
        if best is None:
            return None
        try:
            current = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            current = None
        if current == best:
            return best
        set_alias(client, name, CHAMPION, best)
    return best


def set_alias(client, name: str, alias: str, version: str, attempts: int = 6) -> None:
    """Point an alias at a version, retrying a write that lost a race with another writer.

    MLflow's SQL store sets an alias by read-then-insert: two registrations that set the same
    new alias at once make one of them fail with a unique-key violation (or a locked SQLite
    file). The row exists by then, so the retry takes the update path and succeeds.
    """
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as e:
            if attempt == attempts - 1 or not lost_a_write_race(e):
                raise
            time.sleep(0.05 * 2**attempt)


def lost_a_write_race(error: Exception) -> bool:
    """A unique-key violation or a busy database: another writer got there first."""
    text = str(error).lower()
    if getattr(error, "error_code", "") == "TEMPORARILY_UNAVAILABLE":
        return True
    return any(mark in text for mark in RACE_MARKS)


RACE_MARKS = ("unique constraint", "duplicate key", "integrityerror", "database is locked")


def best_candidate(client, name: str, metric: str, mode: str, fingerprint: str) -> str | None:
    """The best version that beat the champion of its time, on this metric and data."""
    candidates = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        if tags.get(PROMOTABLE) != "true" or tags.get("validation_fingerprint") != fingerprint:
            continue
        if tags.get("tether.metric", metric) != metric or metric not in tags:
            continue
        value = float(tags[metric])
        if not math.isfinite(value):  # a NaN would make the max below depend on order
            continue
        candidates.append((value, -int(mv.version), str(mv.version)))
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda c: (sign * c[0], c[1]))[2]


class NotComparable(ValueError):
    """The champion does something else (another task or label set): no gate can compare."""


def refuse_incomparable(client, name: str, version: str, champion) -> None:
    mine = client.get_model_version(name, version).tags or {}
    theirs = champion.tags or {}
    for key, what in (("tether.task", "task"), ("tether.labels_sha256", "label set")):
        if key in mine and key in theirs and mine[key] != theirs[key]:
            reason = (
                f"{name} v{version} ({what} {mine[key][:16]}) cannot be compared with champion "
                f"v{champion.version} ({what} {theirs[key][:16]}): registered as challenger, "
                "champion not moved. Use another tracking.registered_model for another task, or "
                "`tether models promote` by hand"
            )
            client.set_model_version_tag(name, version, "tether.gate", reason)
            raise NotComparable(reason)


def _champion_value(champion, metric, fingerprint, evaluate_champion, name) -> float:
    tags = champion.tags or {}
    if tags.get("validation_fingerprint") == fingerprint and metric in tags:
        return float(tags[metric])
    if evaluate_champion is None:
        raise ValueError(
            f"champion v{champion.version} was validated on other data and no evaluator was given"
        )
    return float(evaluate_champion(f"models:/{name}/{champion.version}"))


def registered_name(spec) -> str:
    """tracking.registered_model, else the job's own name; never the default 'job', which
    unrelated jobs would share (and then gate against each other's champion)."""
    from tether.errors import SpecError

    default = type(spec).model_fields["name"].default
    name = spec.tracking.registered_model or spec.name
    if name == default and spec.tracking.registered_model is None:
        raise SpecError(
            [
                "tracking.registered_model: registering needs a model name; the job is called "
                f"{default!r} (the default), which unrelated jobs share: set "
                "tracking.registered_model or name"
            ]
        )
    return name


def register_and_gate(
    spec,
    summary: dict[str, Any],
    data_fingerprint: str,
    metric: str,
    mode: str,
    evaluate_champion: Callable[[str, str], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Register the run's logged model and apply the champion gate; returns the decision.

    Called only after the model artifact is fully logged, so no version is ever half-made.
    ``evaluate_champion(model_uri, tracking_uri)`` returns a registered model's metrics on
    this job's validation data.
    """
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(spec.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    name = registered_name(spec)
    value = float(summary["metrics"][metric])
    labels = json.dumps(summary.get("label_names") or [])
    tags = {
        metric: value,
        "tether.metric": metric,
        "tether.mode": mode,
        "tether.task": summary.get("task", spec.model.task),
        "tether.labels_sha256": hashlib.sha256(labels.encode()).hexdigest(),
        "validation_fingerprint": data_fingerprint,
        # lineage: an adapter version names the base it needs (its id and θ*'s hash)
        "tether.base_model": spec.model.name,
        "tether.theta_star_sha256": summary.get("theta_star_sha256"),
        "tether.adapter": json.dumps(summary.get("adapter")),
        "lambda": spec.objective.lam,
        "mode": spec.objective.mode,
        "run_dir": summary.get("run_dir"),
    }
    # MLflow resolves a models:/m-… source through the *global* tracking URI: point it here
    with active_tracking_uri(uri):
        version = register_version(
            client, summary["model_uri"], name, summary["mlflow_run_id"], tags
        )
    rescore = None
    if evaluate_champion is not None:

        def rescore(model_uri: str) -> float:
            return evaluate_champion(model_uri, uri)[metric]

    decision = gate_champion(client, name, version, metric, mode, value, data_fingerprint, rescore)
    print(f"tether: registry: {decision.describe()}")
    out = {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "promoted": decision.promoted,
        "decision": decision.describe(),
        "metric": metric,
        "champion_value": decision.champion_value,
        "champion_version": decision.champion_version,  # None: there is no champion
        "challenger_value": decision.challenger_value,
    }
    if decision.promoted:
        out["champion_uri"] = f"models:/{name}@{CHAMPION}"
    return out


# --------------------------------------------------------------------------- downloads


def fetch_model_dir(model_uri: str, tracking_uri: str | None = None) -> Path:
    """Download a registered tether model into a fresh folder and return its HF folder.

    Always a private copy (a local artifact store would otherwise hand back its own files,
    and we annotate the copy's card with its registry identity).
    """
    import tempfile

    import mlflow
    import yaml

    uri = resolve_tracking_uri(tracking_uri)
    # pin the version first: an alias moving during the download must not mix two versions
    identity = resolve_version(uri, model_uri)
    pinned = f"models:/{identity['name']}/{identity['version']}"
    target = Path(tempfile.mkdtemp(prefix="tether-model-"))
    with active_tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(target)))
    folder = (
        local / hf_artifact_path(model_uri, yaml.safe_load((local / "MLmodel").read_text()))
    ).resolve()
    if not folder.is_relative_to(local.resolve()):  # an MLmodel must not point anywhere else
        raise ValueError(f"{model_uri}: its {HF_ARTIFACT} path leaves the downloaded model")
    annotate(folder, identity)
    return folder


def fetch_adapter_dir(model_uri: str, tracking_uri: str | None = None) -> Path:
    """Download only a registered LoRA version's adapter folder (megabytes, not the merged
    model beside it): what a multi-adapter server needs. Raises ValueError when the version
    holds no adapter."""
    import posixpath
    import tempfile

    import mlflow
    import yaml

    from tether.adapters import ADAPTER_DIR

    uri = resolve_tracking_uri(tracking_uri)
    identity = resolve_version(uri, model_uri)
    pinned = f"models:/{identity['name']}/{identity['version']}"
    target = Path(tempfile.mkdtemp(prefix="tether-model-"))  # discard_download knows it
    with active_tracking_uri(uri):
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{pinned}/MLmodel", dst_path=str(target / "meta")
        )
        hf_path = hf_artifact_path(model_uri, yaml.safe_load(Path(mlmodel).read_text()))
        adapter = posixpath.normpath(posixpath.join(hf_path, ADAPTER_DIR))
        if adapter.startswith(("..", "/")):
            raise ValueError(f"{model_uri}: its {HF_ARTIFACT} path leaves the model")
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{pinned}/{adapter}", dst_path=str(target / "adapter")
            )
        except Exception as e:  # the artifact store's own "not found"
            raise ValueError(f"{model_uri} is not a LoRA model (no {ADAPTER_DIR}/ folder)") from e
    folder = Path(local)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{model_uri} is not a LoRA model (no {ADAPTER_DIR}/adapter_config.json)")
    annotate(folder, identity)
    return folder


def hf_artifact_path(model_uri: str, mlmodel: dict[str, Any]) -> str:
    """Where a tether pyfunc model keeps its HF folder (relative to the model's root)."""
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    if HF_ARTIFACT not in artifacts:
        raise ValueError(f"{model_uri} is not a tether model (no {HF_ARTIFACT!r} artifact)")
    return artifacts[HF_ARTIFACT]["path"]


def annotate(folder: Path, identity: dict[str, Any]) -> None:
    """Record which registry version this copy is, for /v1/model and logs."""
    card = read_card(folder)
    card["registry"] = identity
    write_card(folder, card)


def discard_download(model_dir: Path | str) -> None:
    """Delete a registry download made by ``fetch_model_dir`` (a private temp copy); a folder
    anywhere else is the user's and stays."""
    import shutil
    import tempfile

    folder = Path(model_dir)
    tmp = Path(tempfile.gettempdir()).resolve()
    for parent in [folder, *folder.parents]:
        if parent.parent == tmp and parent.name.startswith("tether-model-"):
            shutil.rmtree(parent, ignore_errors=True)
            return


def resolve_version(tracking_uri: str, model_uri: str) -> dict[str, Any]:
    """models:/NAME@ALIAS or models:/NAME/VERSION → {name, version, alias, run_id}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = ref.split("/", 1)
        alias, mv = None, client.get_model_version(name, version)
    return {"name": name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id}


def version_tags(model_uri: str, tracking_uri: str | None = None) -> dict[str, str]:
    """A registered version's tags (its lineage: task, θ* hash, adapter), without downloading
    anything. Raises MLflow's not-found error for a missing name, version or alias."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    identity = resolve_version(uri, model_uri)
    client = MlflowClient(tracking_uri=uri)
    return describe_version(client, identity["name"], identity["version"])["tags"]


def describe_version(client, name: str, version: str) -> dict[str, Any]:
    """Version metadata: aliases, run id, tags."""
    mv = client.get_model_version(name, version)
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": list(getattr(mv, "aliases", []) or []),
        "run_id": mv.run_id,
        "tags": dict(mv.tags or {}),
    }


def model_card(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "tether.json").read_text())
