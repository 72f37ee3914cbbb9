"""The line a run prints before its first step: where it runs and what it trains.

    scion: backend=cpu devices=8×cpu mesh=data:8,fsdp:1,tensor:1 params=22.7M
        trainable=22.7M (100.0%) dtype=float32 scan_layers=False remat=none attention=einsum

(one line). A device kind's spaces become ``_``; the trainable share follows its count in
parentheses. The line comes
from the setup alone (shapes, mesh, config), so it costs nothing and appears before anything
compiles: a run on the wrong backend, mesh or trainable set shows at once.
"""

from __future__ import annotations

import collections
import math

import jax


def count(tree) -> int:
    """Entries of every leaf of a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def human(number: int) -> str:
    """``22_700_000`` → ``22.7M``; below a thousand, the number itself."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= scale:
            return f"{number / scale:.1f}{suffix}"
    return str(number)


def _percent(part: int, whole: int) -> str:
    share = 100 * part / whole if whole else 0.0
    # A LoRA of a large model trains well under 0.1%: keep two significant digits there.
    return f"{share:.1f}%" if share >= 1 or share == 0 else f"{share:.2g}%"


def _devices(mesh) -> str:
    kinds = collections.Counter(device.device_kind.replace(" ", "_")
                                for device in mesh.devices.flat)
    return "+".join(f"{number}×{kind}" for kind, number in kinds.items())


def describe(setup) -> str:
    """One line naming the backend, devices, mesh axes, parameter counts (all and trainable:
    the state's two trees, so a method's own leaves count and frozen ones in a low-precision
    dtype still count once), compute dtype and the model's layout switches."""
    config = setup.model.config
    state = setup.abstract_state
    trainable = count(state["trainable"])
    total = trainable + count(state["frozen"])
    mesh = ",".join(f"{name}:{size}" for name, size in setup.mesh.shape.items())
    fields = {
        "backend": setup.mesh.devices.flat[0].platform,
        "devices": _devices(setup.mesh),
        "mesh": mesh,
        "params": human(total),
        "trainable": f"{human(trainable)} ({_percent(trainable, total)})",
        "dtype": config.dtype,
        "scan_layers": config.scan_layers,
        "remat": config.remat,
        "attention": config.attention_impl,
    }
    return "scion: " + " ".join(f"{key}={value}" for key, value in fields.items())
