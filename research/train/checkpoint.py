"""Orbax checkpoints of the whole training state plus the data iterator's position.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
while saving leaves only whole checkpoints behind; ``latest_step`` never sees a partial one.
Before restoring, the saved tree is compared with the model's so that a checkpoint of another
model fails with the first differing path instead of deep inside the restore.
"""

from __future__ import annotations

import os

import jax
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


def _check_compatible(manager, step: int, abstract_state) -> None:
    saved = manager.item_metadata(step)["state"]
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


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """``(step, state, data_state)`` from the newest complete checkpoint, or None if there is
    none. ``abstract_state`` holds ShapeDtypeStructs with shardings: arrays are restored directly
    onto their devices."""
    step = manager.latest_step()
    if step is None:
        return None
    _check_compatible(manager, step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if os.path.isdir(os.path.join(manager.directory, str(step), "data")):
        args["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return step, restored["state"], restored.get("data")



def final_params(workdir: str) -> dict:
    """The params (trainable and frozen together) of the newest checkpoint in ``workdir``, as
    saved, whatever method wrote them: the starting point of a later run (``init_from``)."""
    manager = make_manager(workdir)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.model.init_from={workdir!r}: no checkpoint in "
                                    f"{manager.directory}")
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    from research import tree
    return tree.combine(state["trainable"], state["frozen"])
