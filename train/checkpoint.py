"""Orbax checkpoints behind one small class.

Each checkpoint holds the train state (params, optimizer state, step: arrays, possibly
sharded) and a JSON ``meta`` item (step, data position, model spec, data fingerprint).
Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and the
files are written in the background. Orbax writes a step into a temporary directory and
renames it when complete, so a process killed mid-save (even ``kill -9``) leaves the
previous checkpoints intact and the half-written one invisible to ``latest_step``.

Restores take an abstract target (``jax.ShapeDtypeStruct`` with shardings): the arrays are
read straight into that layout, so a run saved on one mesh restores onto another.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from dynrules.errors import DynrulesError


class Checkpointer:
    """Save every ``every`` steps, keep the newest ``keep``; restore onto explicit shardings."""

    def __init__(
        self, directory: str | Path, *, every: int = 1, keep: int = 3, async_save: bool = True
    ):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Start saving ``state`` and ``meta`` at ``step`` if due (or ``force``); True if started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, target, step: int | None = None):
        """(state, meta) at ``step`` (default: latest), laid out as the abstract ``target``.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set; a shape or
        structure that does not match the checkpoint raises DynrulesError.
        """
        step = self._step(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DynrulesError(
                f"checkpoint {self.directory}/{step} does not match this model: {exc}"
            ) from exc
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise DynrulesError(f"no checkpoint in {self.directory}")
        return step
