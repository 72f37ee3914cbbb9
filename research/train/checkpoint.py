"""Orbax checkpoints of the whole training state plus the data iterator's position.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
while saving leaves only whole checkpoints behind; ``latest_step`` never sees a partial one, and
old steps are deleted only once a newer one is complete. A complete checkpoint can still be
damaged afterwards (a truncated or lost file): restoring then warns, sets the step aside as
``STEP.unreadable`` (nothing is deleted) and falls back to the previous step. Before restoring,
the saved tree is compared with the model's so that a checkpoint of another model fails with
the first differing path instead of deep inside the restore.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp


def make_manager(workdir: str, *, keep: int = 3, save_every: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None,
         *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
        args["data"] = ocp.args.JsonSave(data_state)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


class Unreadable(Exception):
    """A checkpoint whose files cannot be read back (truncated, missing)."""


def _reason(err: BaseException) -> str:
    """The innermost cause of a failed read, in one line: tensorstore names the array and the
    file there (the outer errors only repeat the spec)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return str(err).splitlines()[0].split(" [tensorstore_spec=")[0][:400]


def _check_compatible(manager, step: int, abstract_state) -> None:
    try:
        saved = manager.item_metadata(step)["state"]
    except Exception as err:  # noqa: BLE001 -- any failure to read metadata is damage
        raise Unreadable(_reason(err)) from err
    if saved is None:
        raise Unreadable(f"{manager.directory / str(step) / 'state' / '_METADATA'} is missing "
                         "or unreadable")
    saved_flat = {path: getattr(leaf, "shape", None)
                  for path, leaf in _flatten_any(saved).items()}
    # Parameters first: the first differing weight names the mismatch best.
    expected = sorted(_flatten_any(abstract_state).items(),
                      key=lambda item: (not item[0].startswith(("trainable/", "frozen/")), item[0]))
    for path, leaf in expected:
        if path not in saved_flat:
            raise ValueError(f"checkpoint step {step} in {manager.directory} has no {path!r}: "
                             "it was written by a different model or method")
        if saved_flat[path] is not None and tuple(saved_flat[path]) != tuple(leaf.shape):
            raise ValueError(f"checkpoint step {step} in {manager.directory}: {path!r} has shape "
                             f"{tuple(saved_flat[path])}, the model expects {tuple(leaf.shape)}")


def _flatten_any(tree) -> dict:
    """Flatten any pytree (dicts, NamedTuples, lists) into '/'-joined key paths."""
    return {key_path_name(key_path): leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def key_path_name(key_path) -> str:
    """'/'-joined name of a JAX key path (dict keys, attribute names, sequence indices)."""
    names = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def _everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (each reads only its own shards, so one process
    may meet a damaged file the others never open)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _restore(manager, step: int, abstract_state):
    _check_compatible(manager, step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if os.path.isdir(os.path.join(manager.directory, str(step), "data")):
        args["data"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as err:  # noqa: BLE001 -- tensorstore and orbax raise many kinds
        raise Unreadable(_reason(err)) from err
    return restored["state"], restored.get("data")


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """``(step, state, data_state)`` from the newest complete, readable checkpoint, or None if
    there is none. ``abstract_state`` holds ShapeDtypeStructs with shardings: arrays are
    restored directly onto their devices. An unreadable step is set aside with a warning."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data_state = _restore(manager, step, abstract_state)
            reason = None
        except Unreadable as err:
            reason = str(err)
        if _everywhere(reason is None):
            return step, state, data_state
        aside = os.path.join(manager.directory, f"{step}.unreadable")
        print(f"warning: checkpoint step {step} is unreadable ({reason or 'on another process'}); "
              f"moved to {aside}, falling back to the previous checkpoint", file=sys.stderr,
              flush=True)
        if jax.process_index() == 0:
            os.rename(os.path.join(manager.directory, str(step)), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        manager.reload()
    return None


def final_params(workdir: str, key: str = "config.model.init_from") -> dict:
    """The params (trainable and frozen together) of the newest checkpoint in ``workdir``, as
    saved, whatever method and however many processes wrote them: the starting point of a
    later run (``init_from``); ``key`` names the option in errors."""
    manager = make_manager(workdir)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{key}={workdir!r}: no checkpoint in "
                                    f"{manager.directory}")
        # Onto this process's first device, whatever topology wrote it.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                sharding=device),
                              manager.item_metadata(step)["state"])
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    finally:
        manager.close()
    from research import tree
    return tree.combine(state["trainable"], state["frozen"])
