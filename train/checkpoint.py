"""Checkpoints through orbax's ``CheckpointManager``: async, keep-last-N; the train state and the data position."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: Path, config):
        if config.every <= 0 or config.keep <= 0:
            raise ValueError(f"checkpoint.every and checkpoint.keep: expected positive ints; got {config.every}, "
                             f"{config.keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep,
                                               enable_async_checkpointing=config.async_save)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def save(self, step: int, state: dict, data_position: dict) -> None:
        """Returns once the arrays are copied off the devices (the writes may go on in the background)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_position)))

    def restore_latest(self, abstract_state: dict, shardings: dict, batch_size: int) -> dict | None:
        """The latest saved state, placed with ``shardings``, or None when there is none. The saved data
        position must be where this run's batches of ``batch_size`` rows would be at that step."""
        step = self._manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                              shardings)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       data=ocp.args.JsonRestore()))
        # orbax gives containers back as plain tuples / dicts: put the leaves back into the optimizer's types.
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored["state"]))
        position, saved_step = restored["data"], int(jax.device_get(state["step"]))
        if position["step"] != saved_step:
            raise ValueError(f"checkpoint {step}: the data position {position} does not match the state")
        if position["next_row"] != saved_step * batch_size:
            raise ValueError(f"data.batch_size: the checkpoint at step {saved_step} was written with "
                             f"{position['next_row'] // max(saved_step, 1)} rows per step; resuming with {batch_size} "
                             "would skip or repeat data (use a new workdir to change it)")
        return state

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
