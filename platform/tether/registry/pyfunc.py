"""The MLflow pyfunc wrapper: ``mlflow.pyfunc.load_model(uri).predict(df)`` runs the task's
own predictor on the first column of ``df`` (or, for a predictor that names its
``frame_columns``, on those: a QA model's question and context) and returns one row per
input.

Nested prediction fields are spread into columns where that reads well (a classifier's
probabilities become ``p_<label>``) and kept as JSON text otherwise (a tagger's entities).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

HF_ARTIFACT = "hf_model"


def load_predictor(model_dir: Path):
    from tether.card import read_card
    from tether.tasks import task_for_card
    from tether.tasks.predict import DEFAULT_MAX_BATCH_TOKENS

    card = read_card(model_dir)
    task = task_for_card(card)
    return task.predictor(model_dir, card, DEFAULT_MAX_BATCH_TOKENS)


def frame_row(prediction: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in prediction.items():
        if key == "probabilities" and isinstance(value, dict):
            row.update({f"p_{name}": p for name, p in value.items()})
        elif isinstance(value, (list, dict)):
            row[key] = json.dumps(value, ensure_ascii=False)
        else:
            row[key] = value
    return row


def predictions_frame(predictor, column: list[Any]):
    import pandas as pd

    predictions = predictor.predict(predictor.frame_items(column))
    return pd.DataFrame([frame_row(p.model_dump(mode="json")) for p in predictions])


class TetherModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around the serving code path of the model's task."""

    def load_context(self, context) -> None:
        self.predictor = load_predictor(Path(context.artifacts[HF_ARTIFACT]))

    def predict(self, context, model_input, params=None):
        wanted = getattr(self.predictor, "frame_columns", None)  # e.g. question, context
        if hasattr(model_input, "iloc") and wanted:
            missing = [c for c in wanted if c not in model_input.columns]
            if missing:
                raise ValueError(f"the input DataFrame needs the columns {list(wanted)}")
            column = model_input[list(wanted)].to_dict(orient="records")
        elif hasattr(model_input, "iloc"):  # a DataFrame: the first column holds the inputs
            column = list(model_input.iloc[:, 0])
        else:
            column = list(model_input)
        return predictions_frame(self.predictor, column)


def example_frame(model_dir: Path):
    """An input example and its output, for the logged model's signature."""
    import pandas as pd

    predictor = load_predictor(model_dir)
    body = predictor.example()
    column = next(iter(body.values()))
    if isinstance(column, list) and column and isinstance(column[0], dict):
        example = pd.DataFrame(column)  # one column per field, e.g. question and context
        return example, predictions_frame(predictor, example.to_dict(orient="records"))
    example = pd.DataFrame({"text": column if isinstance(column, list) else [column]})
    return example, predictions_frame(predictor, list(example.text))
