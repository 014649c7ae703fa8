"""Orbax checkpoints: composite items (train state, data-iterator state, metadata/config).

Saves are asynchronous; a checkpoint step directory only appears (finalized) once every item is
fully written, so a kill -9 mid-save leaves the previous checkpoint as the latest complete one.
Restores go against an abstract target that carries shardings, so a run resumes on another mesh.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import jax
import orbax.checkpoint as ocp

from sorajax.errors import UserError

log = logging.getLogger(__name__)


JSON_ITEMS = ("data", "meta")


def _single_process_array_handler():
    """One process owns every device: Orbax's replica-parallel save (each replica of a replicated
    array writes a slice, to spread the writes over hosts) has no hosts to spread over, and its
    per-device slicing costs a small compile per (array shape, device) -- ~280 programs and ~6 s
    at the first save of the toy run on 8 devices. Multi-process runs keep Orbax's default."""
    global _HANDLER_SET
    if jax.process_count() == 1 and not _HANDLER_SET:
        absl_log = logging.getLogger("absl")  # Orbax warns on every override; this one is meant
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        finally:
            absl_log.setLevel(level)
        _HANDLER_SET = True


_HANDLER_SET = False


def list_steps(directory: str) -> list[int]:
    """Finalized checkpoint steps in `directory` (step folders are digits only; an unfinished
    save lives under a temporary name and a damaged one moved aside as STEP.unreadable), oldest
    first. Reads the folder names only: no Orbax manager is opened."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(x) for x in os.listdir(directory) if x.isdigit())


class Checkpointer:
    """Items: "model" (all model parameters), "ema" (EMA of the trained ones), "opt" (optimizer
    state), "train" (step, RNG key, counters) as array pytrees; "data" (iterator state) and
    "meta" (config, tokenizer, stage) as JSON. Any subset can be saved or restored."""

    ITEMS = ("model", "ema", "opt", "train", "data", "meta")

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        _single_process_array_handler()
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

    def restore_latest_good(self, abstract: dict, *, optional: tuple[str, ...] = (),
                            move_aside: bool = True):
        """Restores the newest checkpoint that reads back; names and skips unreadable ones.
        Returns (step, items), or None when there is no checkpoint at all. Items named in
        `optional` are restored only from steps that have them (e.g. "ema" of a converted
        checkpoint, which has none). The trainer and the sampler both restore through here.

        Skipped (newer) steps are moved aside to STEP.unreadable once an older one restored:
        left in place, the run could not save that step again (Orbax refuses an existing or
        older step). When none reads back, nothing is moved and UserError is raised: that is
        a config that does not match the checkpoints far more often than all of them being
        corrupt, and starting over from scratch would silently lose the run."""
        bad = []
        for step in reversed(self.all_steps()):
            step_dir = os.path.join(self.directory, str(step))
            want = {k: v for k, v in abstract.items()
                    if k not in optional or os.path.isdir(os.path.join(step_dir, k))}
            try:
                items = self.restore(step, want)
            except Exception as e:  # truncated/corrupt files: fall back to an older step
                first = str(e).splitlines()[0][:200] if str(e) else ""
                bad.append((step, f"{type(e).__name__}: {first}"))
                msg = (f"checkpoint {os.path.join(self.directory, str(step))} is unreadable "
                       f"({bad[-1][1]}); skipping it")
                log.warning(msg)
                print(f"warning: {msg}", file=sys.stderr, flush=True)
                continue
            if bad and move_aside:
                self._move_aside([s for s, _ in bad])
            return step, items
        if bad:
            raise UserError(
                f"no checkpoint in {self.directory} can be restored (newest, step {bad[0][0]}: "
                f"{bad[0][1]}); if the config changed, use a new --workdir; if the files are "
                f"damaged, move the step directories away to start over")
        return None

    def _move_aside(self, steps):
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = src + ".unreadable"
                if os.path.exists(dst):
                    dst += f"-{int(time.time())}"
                os.replace(src, dst)
                print(f"warning: moved {src} to {dst}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sorajax_checkpoint_move_aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying shardings, for restoring onto a (possibly different) mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
