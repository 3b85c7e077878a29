"""Evaluation of a pretrained encoder on labelled shards.

- `features`: pooled features of the frozen encoder, extracted over every process (`extract`),
  and the linear protocol's train-time augmentation (`crop_and_flip`);
- `classifiers`: what is fitted on them (`fit_linear`, `fit_sgd_linear`, `knn_accuracy`);
- `report`: `evaluate`, the report of `augssl eval` (`eval.json`), and `online_knn`, the k-NN
  the engine logs while training.

A run's model is loaded from its checkpoint by `framework.checkpoint.load_run`.
"""

from framework.eval.classifiers import fit_linear, fit_sgd_linear, knn_accuracy
from framework.eval.features import crop_and_flip, extract
from framework.eval.report import PROTOCOLS, evaluate, online_knn

__all__ = [
    "PROTOCOLS",
    "crop_and_flip",
    "evaluate",
    "extract",
    "fit_linear",
    "fit_sgd_linear",
    "knn_accuracy",
    "online_knn",
]
