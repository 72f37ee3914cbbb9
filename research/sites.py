"""Sites: where a method meets the model, shared by every family.

A method that needs the model to know about it (a low-rank path, an adapter, a prompt, a
feature tap) plugs in at *sites*: the ``__call__`` of named modules, intercepted by Flax
(``nn.intercept_methods``) so model code never mentions it. This module holds the parts each
family used to rebuild for itself:

- path helpers (:func:`parent`, :func:`join`, :func:`leaf`), over the tree's ``/`` names;
- :func:`intercept`: run a handler at every layer call a predicate picks, with the layer's
  path (the layer view ``layer_*`` inside a scanned stack), its inputs, how many trailing
  input axes its kernel contracts and the dtype it computes in (:class:`Call`);
- :func:`capture`: record the outputs of chosen modules (distillation, side networks);
- :func:`kth_largest_magnitude`: the exact top-k threshold that masks and merges share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from research import tree
from research.models.layers import MultiAxisDense, module_path

# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def parent(path: str) -> str:
    """``encoder/layer_0/attn/query`` of ``encoder/layer_0/attn/query/kernel``."""
    return path.rpartition(tree.SEP)[0]


def leaf(path: str) -> str:
    """``kernel`` of ``encoder/layer_0/attn/query/kernel``."""
    return path.rpartition(tree.SEP)[2]


def join(*parts: str) -> str:
    """The parts joined by ``/``, empty parts dropped (a leaf at the root has no parent)."""
    return tree.SEP.join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

LAYERS = (nn.Dense, MultiAxisDense, nn.Embed)  # the layers a kernel-side method adapts


def input_axes_of(layer: nn.Module) -> int:
    """How many trailing input axes a layer contracts: 0 for an embedding lookup, 1 for
    ``nn.Dense``, the kernel's input axes for ``MultiAxisDense`` (read off the layer, not its
    kernel, so a tree whose kernels were factorised away still works)."""
    if isinstance(layer, nn.Embed):
        return 0
    if isinstance(layer, nn.Dense):
        return 1
    if isinstance(layer, MultiAxisDense):
        return len(layer.kernel_axes) - len(layer.features)
    raise ValueError(f"a method's leaves at {tree.SEP.join(layer.path)} sit in a "
                     f"{type(layer).__name__}; they adapt nn.Dense, MultiAxisDense and nn.Embed")


def compute_dtype_of(layer: nn.Module, inputs, param):
    """The dtype the layer computes in, which a method's path beside it follows."""
    if isinstance(layer, MultiAxisDense):
        return layer.config.compute_dtype
    if isinstance(layer, nn.Embed):
        return layer.dtype or param.dtype
    return layer.dtype or jnp.result_type(inputs, param)


def first_input(args: tuple, kwargs: Mapping):
    return args[0] if args else next(iter(kwargs.values()))


@dataclasses.dataclass(frozen=True)
class Call:
    """One intercepted ``__call__``: the layer, its path, its arguments, and ``run`` (the
    layer's own computation, to call with the same or changed arguments)."""
    layer: nn.Module
    path: str
    args: tuple
    kwargs: dict
    run: Callable

    @property
    def inputs(self):
        return first_input(self.args, self.kwargs)

    @property
    def input_axes(self) -> int:
        return input_axes_of(self.layer)

    def dtype(self, param):
        """The compute dtype of this layer, given one of the method's params beside it."""
        return compute_dtype_of(self.layer, self.inputs, param)

    def has(self, name: str) -> bool:
        return self.layer.has_variable("params", name)

    def param(self, name: str):
        return self.layer.get_variable("params", name)

    def output(self):
        """The layer's own output for its own arguments."""
        return self.run(*self.args, **self.kwargs)


def holding(*names: str) -> Callable[[nn.Module], bool]:
    """A site predicate: the layer holds every param in ``names`` (``lora_a``, ``ia3_l``...)."""
    return lambda layer: all(layer.has_variable("params", name) for name in names)


def at(paths: Container[str]) -> Callable[[nn.Module], bool]:
    """A site predicate: the layer's path (layer view under a scan) is in ``paths``."""
    return lambda layer: module_path(layer) in paths


def intercept(handler: Callable[[Call], Any], where: Callable[[nn.Module], bool], *,
              seen: set | None = None):
    """A context manager under which every ``__call__`` of a module that ``where`` picks
    returns ``handler(Call)`` instead of its own output; ``seen`` (if given) collects the paths
    handled, so a method can say which of its sites the model never reached."""
    def interceptor(next_fun, args, kwargs, context):
        layer = context.module
        if context.method_name != "__call__" or not where(layer):
            return next_fun(*args, **kwargs)
        path = module_path(layer)
        if seen is not None:
            seen.add(path)
        return handler(Call(layer, path, args, kwargs, next_fun))
    return nn.intercept_methods(interceptor)


def capture(paths: Container[str], features: dict):
    """A context manager that stores the output of each module at ``paths`` in
    ``features[path]`` (PELA's distillation sites, side-tuning's taps)."""
    def record(call: Call):
        features[call.path] = out = call.output()
        return out
    return intercept(record, at(paths))


def check_reached(paths: Iterable[str], seen: Container[str], *, what: str,
                  called: Iterable[str] = ()) -> None:
    """One line naming the first of ``paths`` the model never called: a method's leaves there
    would silently do nothing."""
    missing = [path for path in paths if path not in seen]
    if missing:
        near = ", ".join(tree.closest_paths(missing[0], sorted(called)))
        raise ValueError(f"{what} at {missing[0]!r} sit at no layer the model calls"
                         + (f"; closest called: {near}" if near else ""))


# ---------------------------------------------------------------------------------------------
# Top-k
# ---------------------------------------------------------------------------------------------

CHUNK = 1 << 15  # elements per step of chunked passes: their temporaries stay in cache


def chunks(flat: np.ndarray):
    """Cache-sized views of a flat array, for elementwise passes without tensor-sized
    temporaries."""
    return (flat[start:start + CHUNK] for start in range(0, flat.size, CHUNK))


def kth_largest_magnitude(flat: np.ndarray, k: int) -> tuple[float, int]:
    """The k-th largest ``|x|`` of a flat array, and how many entries exceed it, with no
    tensor-sized temporary: a sorted strided sample brackets the answer, one chunked pass
    counts the entries above the bracket and collects those inside, and a partition of those
    few finishes. Exact: if the bracket misses (rare), a full partition decides."""
    n = flat.size
    sample = np.sort(np.abs(flat[::max(1, n // (1 << 16))]))
    m, q = sample.size, 1 - k / n
    margin = 6 * np.sqrt(q * (1 - q) / m) + 6 / m
    low = sample[int((q - margin) * m)] if q - margin > 0 else -np.inf
    high = sample[int(np.ceil((q + margin) * m))] if q + margin < 1 - 1 / m else np.inf
    above, inside = 0, []
    for part in chunks(flat):
        magnitudes = np.abs(part)
        above += int(np.count_nonzero(magnitudes > high))
        inside.append(magnitudes[(magnitudes >= low) & (magnitudes <= high)])
    inside = np.concatenate(inside)
    need = k - above
    if not 1 <= need <= inside.size:
        inside, above, need = np.abs(flat), 0, k
    threshold = np.partition(inside, inside.size - need)[inside.size - need]
    return threshold, above + int(np.count_nonzero(inside > threshold))
