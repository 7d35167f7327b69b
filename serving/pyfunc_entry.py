"""MLflow's models-from-code entry point: MLflow runs this file to build the model when it
loads one (see serving/pyfunc.py), instead of unpickling an object."""

import mlflow

from serving.pyfunc import ClinicalNoteModel

mlflow.models.set_model(ClinicalNoteModel())
