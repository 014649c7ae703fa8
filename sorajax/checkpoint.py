"""Orbax checkpoints: composite items (train state, data-iterator state, metadata/config).

Saves are asynchronous; a checkpoint step directory only appears (finalized) once every item is
fully written, so a kill -9 mid-save leaves the previous checkpoint as the latest complete one.
Restores go against an abstract target that carries shardings, so a run resumes on another mesh.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


JSON_ITEMS = ("data", "meta")


class Checkpointer:
    """Items: "model" (all model parameters), "ema" (EMA of the trained ones), "opt" (optimizer
    state), "train" (step, RNG key, counters) as array pytrees; "data" (iterator state) and
    "meta" (config, tokenizer, stage) as JSON. Any subset can be saved or restored."""

    ITEMS = ("model", "ema", "opt", "train", "data", "meta")

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, items: dict, *, force: bool = False) -> bool:
        args = {}
        for name, value in items.items():
            args[name] = ocp.args.JsonSave(value) if name in JSON_ITEMS else ocp.args.StandardSave(value)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract: dict) -> dict:
        """`abstract`: item name -> abstract pytree (ShapeDtypeStructs with shardings), or None
        for the JSON items."""
        args = {}
        for name, value in abstract.items():
            args[name] = ocp.args.JsonRestore() if name in JSON_ITEMS else ocp.args.StandardRestore(value)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {name: out[name] for name in abstract}

    def restore_latest_good(self, abstract: dict):
        """Restores the newest checkpoint that reads back; names and skips unreadable ones.
        Returns (step, items) or None when there is no readable checkpoint."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract)
            except Exception as e:  # truncated/corrupt files: fall back to an older step
                first = str(e).splitlines()[0][:200] if str(e) else ""
                msg = (f"checkpoint {os.path.join(self.directory, str(step))} is unreadable "
                       f"({type(e).__name__}: {first}); skipping it")
                log.warning(msg)
                print(f"warning: {msg}", flush=True)
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying shardings, for restoring onto a (possibly different) mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
