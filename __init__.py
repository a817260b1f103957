"""dynrules: data-adaptive safety rules for training reward models.

The small public API, imported on first use (JAX only loads with the training entry points):

- rules and ratings: ``load_pool``, ``RatingStore``, ``ingest``, ``rate_pairs``, ``make_judge``
- selection and labels: ``SelectionConfig``, ``run_selection``
- diagnostics: ``ablate``, ``simulate``
- training and the main job: ``train_reward_model``, ``evaluate``, ``train_adapter``,
  ``run_pipeline``, ``PipelineConfig``
- planning a run on a TPU slice: ``plan_training`` (returns a ``TrainingPlan``)
- serving: ``RewardClient`` (rewards from a running ``dynrules serve``)
- errors: ``DynrulesError``, ``InputError``
"""

from __future__ import annotations

import importlib

from dynrules.platforms import skip_absent_tpu

__version__ = "0.1.0"

skip_absent_tpu()  # before any module of the package imports JAX

_EXPORTS = {
    "load_pool": "dynrules.engine.pool",
    "RatingStore": "dynrules.engine.store",
    "ingest": "dynrules.engine.ingest",
    "rate_pairs": "dynrules.engine.judges.runner",
    "make_judge": "dynrules.engine.judges",
    "SelectionConfig": "dynrules.engine.select",
    "run_selection": "dynrules.engine.select",
    "ablate": "dynrules.engine.ablate",
    "simulate": "dynrules.engine.simulate",
    "train_reward_model": "dynrules.train.trainer",
    "evaluate": "dynrules.train.evaluate",
    "train_adapter": "dynrules.train.adapter",
    "run_pipeline": "dynrules.pipeline",
    "PipelineConfig": "dynrules.pipeline",
    "plan_training": "dynrules.plan",
    "TrainingPlan": "dynrules.plan",
    "RewardClient": "dynrules.client",
    "DynrulesError": "dynrules.errors",
    "InputError": "dynrules.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dynrules' has no attribute {name!r}")
