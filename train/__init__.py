"""Training stack: reward models on an encoder or a decoder, sharding, Orbax checkpoints, scoring, eval.

The public entry points are re-exported here and imported on first use, so that
``import dynrules.train`` stays cheap until JAX is actually needed:

- ``embed_texts(texts, *, batch_size=64, max_length=256) -> np.ndarray [n, 384]``
- ``train_reward_model(pairs, out_dir, config=None, *, progress=True) -> RunResult``
- ``evaluate(model, pairs, *, batch_size=64, mesh="") -> Evaluation``
- ``score_file(model, input_path, out_path, ...) -> ScoreSummary`` and ``Scorer``
- ``TrainConfig``, ``load_config``; ``Classifier`` / ``ModelSpec`` (backbone + head: the
  building block for multi-label heads such as the rule adapter)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embed_texts": "dynrules.models.embedder",
    "train_reward_model": "dynrules.train.trainer",
    "RunResult": "dynrules.train.trainer",
    "evaluate": "dynrules.train.evaluate",
    "score_file": "dynrules.train.scoring",
    "Scorer": "dynrules.train.scoring",
    "TrainConfig": "dynrules.train.config",
    "load_config": "dynrules.train.config",
    "Classifier": "dynrules.models.classifier",
    "ModelSpec": "dynrules.models.classifier",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dynrules.train' has no attribute {name!r}")
