"""Models in MLflow: the pyfunc wrapper, logging, registration, and the gated `champion` alias.

A trained model folder (HF format + tether.json) is logged as an MLflow pyfunc model whose
artifact *is* that folder, so weights stay safetensors and serving can use the folder directly
(``fetch_model_dir``). ``mlflow.pyfunc.load_model(uri).predict(["a text", ...])`` returns a
DataFrame: label, label_id and one probability column per label.

Only load models your own platform registered: loading an MLflow model unpickles its wrapper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from tether.tracking import active_tracking_uri, resolve_tracking_uri

HF_ARTIFACT = "hf_model"
CHAMPION, CHALLENGER = "champion", "challenger"


class TetherTextClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around the serving code path: texts in, label + probabilities out."""

    def load_context(self, context) -> None:
        from tether.serving.model import load_served_model

        self.model = load_served_model(Path(context.artifacts[HF_ARTIFACT]))

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "iloc"):  # a DataFrame: the first column holds the texts
            texts = [str(t) for t in model_input.iloc[:, 0]]
        else:
            texts = [str(t) for t in model_input]
        return predictions_frame(self.model, texts)


def predictions_frame(model, texts: list[str]):
    """One row per text: label, label_id, p_<label> for every label."""
    import pandas as pd

    return pd.DataFrame(
        [
            {"label": p.label, "label_id": p.label_id}
            | {f"p_{name}": prob for name, prob in p.probabilities.items()}
            for p in model.classify(texts)
        ]
    )


def log_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log the folder as the run's pyfunc model; returns its URI (MLflow 3: models:/m-...)."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from tether.serving.model import load_served_model

    example = pd.DataFrame({"text": ["a wonderful, moving film", "dull and far too long"]})
    output = predictions_frame(load_served_model(Path(model_dir)), list(example.text))
    with active_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TetherTextClassifier(),
            artifacts={HF_ARTIFACT: str(model_dir)},
            signature=infer_signature(example, output),
            input_example=example,
            # pinned explicitly: inferring requirements imports and probes every dependency
            pip_requirements=["tether", "torch", "transformers", "safetensors", "pandas"],
        )
    return info.model_uri


# --------------------------------------------------------------------------- registry


@dataclass
class GateDecision:
    name: str
    version: str
    metric: str
    challenger_value: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool

    def describe(self) -> str:
        if self.champion_version is None:
            return (
                f"{self.name} v{self.version} becomes champion: no champion yet "
                f"({self.metric} {self.challenger_value:.4f})"
            )
        verb = "beats" if self.promoted else "does not beat"
        return (
            f"{self.name} v{self.version} {verb} champion v{self.champion_version}: "
            f"{self.metric} {self.challenger_value:.4f} vs {self.champion_value:.4f}"
            + ("; champion moved" if self.promoted else "; champion stays")
        )


def register_version(client, model_uri: str, name: str, run_id: str, tags: dict[str, Any]) -> str:
    """Register a complete logged model as a new version (never a half-written one)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
    )
    return str(version.version)


def gate_champion(
    client,
    name: str,
    version: str,
    metric: str,
    value: float,
    data_fingerprint: str,
    evaluate_champion=None,
) -> GateDecision:
    """Set `challenger` to the new version; move `champion` only if it scores higher.

    The comparison is on the same validation data: the champion's recorded metric is used when
    its validation fingerprint matches, otherwise ``evaluate_champion(model_uri)`` re-scores it.
    """
    from mlflow.exceptions import MlflowException

    client.set_registered_model_alias(name, CHALLENGER, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is None:
        decision = GateDecision(name, version, metric, value, None, None, True)
    else:
        champ_value = _champion_value(champion, metric, data_fingerprint, evaluate_champion, name)
        promoted = value > champ_value
        decision = GateDecision(
            name, version, metric, value, str(champion.version), champ_value, promoted
        )
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "tether.gate", decision.describe())
    client.update_model_version(name, version, description=decision.describe())
    return decision


def _champion_value(champion, metric, fingerprint, evaluate_champion, name) -> float:
    tags = champion.tags or {}
    if tags.get("validation_fingerprint") == fingerprint and metric in tags:
        return float(tags[metric])
    if evaluate_champion is None:
        raise ValueError(
            f"champion v{champion.version} was validated on other data and no evaluator was given"
        )
    return float(evaluate_champion(f"models:/{name}/{champion.version}"))


def fetch_model_dir(model_uri: str, tracking_uri: str | None = None) -> Path:
    """Download a registered tether model into a fresh folder and return its HF folder.

    Always a private copy (a local artifact store would otherwise hand back its own files,
    and we annotate the copy's card with its registry identity).
    """
    import tempfile

    import mlflow
    import yaml

    uri = resolve_tracking_uri(tracking_uri)
    target = Path(tempfile.mkdtemp(prefix="tether-model-"))
    with active_tracking_uri(uri):
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target))
        )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    if HF_ARTIFACT not in artifacts:
        raise ValueError(f"{model_uri} is not a tether model (no {HF_ARTIFACT!r} artifact)")
    folder = local / artifacts[HF_ARTIFACT]["path"]
    # record which registry version this copy is, for /v1/model and logs
    card = model_card(folder)
    card["registry"] = resolve_version(uri, model_uri)
    (folder / "tether.json").write_text(json.dumps(card, indent=2))
    return folder


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


def describe_version(client, name: str, version: str) -> dict[str, Any]:
    """Version metadata for serving's /v1/model: aliases, run id, tags."""
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


def register_and_gate(spec, summary: dict[str, Any], data) -> dict[str, Any]:
    """Register the run's logged model and apply the champion gate; returns the decision.

    Called only after the model artifact is fully logged, so no version is ever half-made.
    """
    from mlflow.tracking import MlflowClient

    from tether.tasks import get_task
    from tether.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    name = spec.tracking.registered_model or spec.name
    metric = get_task(spec.model.task).primary_metric
    value = float(summary["metrics"][metric])
    tags = {
        metric: value,
        "validation_fingerprint": data.fingerprint,
        "lambda": spec.objective.lam,
        "mode": spec.objective.mode,
        "run_dir": summary.get("run_dir"),
    }
    # MLflow resolves a models:/m-… source through the *global* tracking URI: point it here
    with active_tracking_uri(uri):
        version = register_version(
            client, summary["model_uri"], name, summary["mlflow_run_id"], tags
        )
    decision = gate_champion(
        client,
        name,
        version,
        metric,
        value,
        data.fingerprint,
        evaluate_champion=lambda model_uri: score_on_validation(spec, model_uri, uri, metric),
    )
    print(f"tether: registry: {decision.describe()}")
    out = {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "promoted": decision.promoted,
        "decision": decision.describe(),
        "champion_value": decision.champion_value,
        "challenger_value": decision.challenger_value,
    }
    if decision.promoted:
        out["champion_uri"] = f"models:/{name}@{CHAMPION}"
    return out


def score_on_validation(spec, model_uri: str, tracking_uri: str, metric: str) -> float:
    """Re-score a registered model on this job's validation data (its own tokenizer)."""
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForSequenceClassification

    from tether.data import prepare_data
    from tether.loop import evaluate
    from tether.models import load_tokenizer
    from tether.tasks import get_task

    folder = fetch_model_dir(model_uri, tracking_uri)
    tokenizer = load_tokenizer(str(folder))
    card = model_card(folder)
    data = prepare_data(spec.data, tokenizer, str(folder), card.get("label_names"))
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    metrics = evaluate(
        model,
        data.validation,
        get_task(spec.model.task),
        len(data.label_names),
        data.pad_id,
        spec.train.eval_batch_size,
        0,
        1,
        torch.device("cpu"),
        nullcontext(),
    )
    return float(metrics[metric])
