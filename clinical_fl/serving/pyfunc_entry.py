"""MLflow's models-from-code entry point: MLflow runs this file to build the model when it
loads one (see clinical_fl/serving/pyfunc.py), instead of unpickling an object."""

import mlflow

from clinical_fl.serving.pyfunc import ClinicalNoteModel

mlflow.models.set_model(ClinicalNoteModel())
