"""The training loop: one jitted step after another, periodic hooks between.

The trainer (train.trainer, whatever its task) is set up → loop → finish (the shape of MaxText's
train loop and Flax's gemma example). Setup builds the state and a step function;
:func:`run_steps` runs steps and calls each :class:`Every` hook on its period (checkpointing,
logging, evaluation); finish exports. A hook may return a dict, shown as the progress bar's
postfix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from dynrules.output import progress_bar


@dataclasses.dataclass
class StepOutput:
    """What a hook sees after a step."""

    step: int  # steps done so far (1 after the first step)
    state: Any
    metrics: Any  # what the step function returned beside the state (device values)
    batch: dict  # this process's host batch of the step


@dataclasses.dataclass
class Every:
    """Call ``fn(output)`` after every ``period``-th step; after the last one too if ``at_end``.

    ``period = 0`` never fires on the period (``at_end`` alone decides). Without ``at_end`` the
    last step does not fire even when it falls on the period: the finish phase handles it.
    """

    period: int
    fn: Callable[[StepOutput], dict | None]
    at_end: bool = True

    def due(self, step: int, last: int) -> bool:
        if step == last:
            return self.at_end
        return bool(self.period) and step % self.period == 0


def run_steps(
    state,
    step_fn: Callable,
    batch_at: Callable[[int], dict],
    feed: Callable[[dict], Any],
    *,
    start: int,
    stop: int,
    hooks: tuple[Every, ...] = (),
    desc: str = "train",
    progress: bool = True,
):
    """Steps ``start`` … ``stop − 1``: ``state, metrics = step_fn(state, feed(batch_at(step)))``.

    ``batch_at`` gives the host batch of a step (a pure function of the step, so a resumed run
    sees the same data); ``feed`` places it on the mesh. Returns the final state.
    """
    with progress_bar(total=stop, initial=start, progress=progress, desc=desc, unit="step") as bar:
        for step in range(start, stop):
            batch = batch_at(step)
            state, metrics = step_fn(state, feed(batch))
            output = StepOutput(step + 1, state, metrics, batch)
            for hook in hooks:
                if hook.due(step + 1, stop):
                    postfix = hook.fn(output)
                    if postfix:
                        bar.set_postfix(postfix)
            bar.update(1)
    return state
