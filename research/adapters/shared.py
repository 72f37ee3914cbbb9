"""Adapters shared across tasks. VL-Adapter (Sung, Cho & Bansal, 2022, "VL-Adapter:
Parameter-Efficient Transfer Learning for Vision-and-Language Tasks") trains one model on several
tasks at once and finds that a single set of adapters shared by every task ("single adapter")
matches one set per task at a fraction of the parameters: the tasks' knowledge meets in the
shared weights. Here the adapters are Houlsby's (:mod:`research.adapters.bottleneck`, same
sites, init and options) and only the output head is per task, since the tasks' label sets
differ (VL-Adapter's tasks share a text decoder, told the task by a text prefix).

Per-task heads (also used by :mod:`research.adapters.polyhistor`): every leaf of the ``head``
module (``classifier/kernel``, ``classifier/bias``) gets a stacked copy per task beside it,
``classifier/task_kernel [tasks, ...]``, started from the model's own head, so the output is
unchanged at init. ``task`` picks the row a call uses; the model's own head leaves are left
unused. A run trains one task per step (``launch/multitask.py`` alternates them, switching
``task``).

:meth:`SharedAdapter.export` is one task's model: the adapters kept beside the plain params
(they cannot fold) and that task's head in place of the model's, which plain Houlsby adapters
run (:meth:`SharedAdapter.as_adapters`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax.numpy as jnp

from research import sites, tree
from research.adapters.bottleneck import Bottleneck, Houlsby
from research.methods import Applied, register

TASK_PREFIX = "task_"


def check_tasks(tasks, task) -> tuple[tuple[str, ...], str]:
    """``(tasks, task)`` checked: names unique and non-empty; ``task`` one of them (default the
    first)."""
    tasks = tuple(tasks or ())
    if not tasks or not all(isinstance(name, str) and name for name in tasks):
        raise ValueError(f"config.method.tasks={tasks!r} must name the tasks (non-empty strings, "
                         "e.g. the data names)")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"config.method.tasks={tasks!r} names a task twice")
    task = tasks[0] if task is None else task
    if task not in tasks:
        raise ValueError(f"config.method.task={task!r} is not one of config.method.tasks="
                         f"{list(tasks)}")
    return tasks, task


def head_patterns(head: str | None) -> tuple[str, ...]:
    """Regexes of the per-task head leaves (what trains)."""
    return () if head is None else (rf"{re.escape(head)}/{TASK_PREFIX}[^/]+",)


def _head_leaves(flat: dict, head: str) -> list[str]:
    """The model's own leaves directly in module ``head``."""
    found = [p for p in flat if sites.parent(p) == head
             and not sites.leaf(p).startswith(TASK_PREFIX)]
    if not found:
        modules = sorted({sites.parent(p) for p in flat})
        raise ValueError(f"config.method.head={head!r} is not a module with params; closest: "
                         f"{', '.join(tree.closest_paths(head, modules))}")
    return found


def _task_path(path: str) -> str:
    return sites.join(sites.parent(path), TASK_PREFIX + sites.leaf(path))


def add_task_heads(flat: dict, head: str | None, count: int) -> dict:
    """``flat`` with ``count`` copies of every leaf of ``head`` stacked beside it."""
    if head is None:
        return flat
    out = dict(flat)
    for path in _head_leaves(flat, head):
        out[_task_path(path)] = jnp.broadcast_to(flat[path], (count, *flat[path].shape))
    return out


def task_head_axes(flat_logical: dict, flat_shapes: dict, head: str | None) -> dict:
    """Logical axes of the per-task heads: the task axis unsharded, the rest as the head's."""
    if head is None:
        return flat_logical
    out = dict(flat_logical)
    for path in _head_leaves(flat_shapes, head):
        out[_task_path(path)] = (None, *(flat_logical.get(path) or
                                         (None,) * len(flat_shapes[path].shape)))
    return out


def with_task_head(flat: dict, head: str | None, index: int) -> dict:
    """``flat`` with task ``index``'s head in place of the model's, the stacked copies gone."""
    if head is None:
        return flat
    out = {p: v for p, v in flat.items() if not (sites.parent(p) == head and
                                                 sites.leaf(p).startswith(TASK_PREFIX))}
    for path in _head_leaves(flat, head):
        stacked = flat.get(_task_path(path))
        if stacked is None:
            raise ValueError(f"per-task head {_task_path(path)!r} is not in the params (run "
                             f"init first)")
        out[path] = stacked[index]
    return out


class PerTask:
    """What a multi-task adapter method (this one, Polyhistor) adds to its adapter options
    (Bottleneck's, and ``tasks``, ``task``): ``task`` picks the head (and embedding) a call
    uses, and one task's export runs as plain Houlsby adapters."""

    @property
    def index(self) -> int:
        return self.tasks.index(self.task)

    def for_task(self, task: str):
        """This method running ``task``'s adapters and head."""
        return dataclasses.replace(self, task=task)

    def as_adapters(self) -> Bottleneck:
        """The plain adapter method that runs :meth:`export`'s params."""
        return Bottleneck(targets=self.targets, reduction_factor=self.reduction_factor,
                          bottleneck=self.bottleneck, nonlinearity=self.nonlinearity,
                          init_scale=self.init_scale, also_train=self.also_train,
                          input_axes=self.input_axes)


@register("shared_adapter")
@dataclasses.dataclass(frozen=True)
class SharedAdapter(PerTask, Houlsby):
    """Shared-adapter options (``config.method = dict(name='shared_adapter', ...)``): Houlsby's
    (targets, reduction_factor, bottleneck, nonlinearity, init_scale, also_train, input_axes),
    plus

    tasks: the task names (``launch/multitask.py`` reads them as data names).
    task: the task whose head this method runs (default the first).
    head: the module every task gets its own copy of (``None``: one head for all).
    Trainable: the adapters, the per-task heads and ``also_train``.
    """

    tasks: tuple = ()
    task: str | None = None
    head: str | None = "classifier"

    label: ClassVar[str] = "shared_adapter"

    def __post_init__(self):
        given = self.trainable
        super().__post_init__()
        tasks, task = check_tasks(self.tasks, self.task)
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "task", task)
        if given is None:
            object.__setattr__(self, "trainable", (*self.trainable, *head_patterns(self.head)))

    def init(self, rng, params: dict, stats=None) -> dict:
        """Houlsby's adapters, and one copy of the model's head per task."""
        flat = tree.flatten(super().init(rng, params, stats))
        return tree.unflatten(add_task_heads(flat, self.head, len(self.tasks)))

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        flat = tree.flatten(super().logical_axes(logical, shapes))
        return tree.unflatten(task_head_axes(flat, tree.flatten(shapes), self.head))

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """The shared adapters with ``task``'s head."""
        return super().apply(module, {**variables, "params": self.export(variables["params"])},
                             *args, **kwargs)

    def export(self, params: dict) -> dict:
        """``task``'s model: the shared adapters beside the params, its head in the model's."""
        return tree.unflatten(with_task_head(tree.flatten(params), self.head, self.index))
