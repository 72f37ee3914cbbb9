"""Subspace training (Li et al., 2018, "Measuring the Intrinsic Dimension of Objective
Landscapes"; Aghajanyan et al., 2020, "Intrinsic Dimensionality Explains the Effectiveness of
Language Model Fine-Tuning"): train only ``z`` in ``θ = θ0 + P·z``, with ``θ0`` frozen and
``P`` a fixed random ``D × d`` projection. The smallest ``d`` whose run reaches 90% of full
training's accuracy (d90) measures how many directions the problem really needs.

``P`` is never formed. ``fastfood`` (Le et al., 2013, as Li et al. use it) stacks blocks
``V_i = S_i H G_i Π_i H B_i`` of size ``d' = 2^ceil(log2 d)`` until they cover ``D`` (``H`` the
Walsh–Hadamard transform, ``B`` random signs, ``Π`` a permutation, ``G`` Gaussian, ``S`` the
block's scale): ``P·z`` costs ``O(D log d)``. ``sparse`` (Li, Hastie & Church, 2006, "Very
Sparse Random Projections") gives each of the ``D`` rows ``nonzeros`` entries ``±c`` in random
columns: ``O(D · nonzeros)``. Both scale ``P``'s columns to about unit norm, so
``||θ − θ0|| ≈ ||z||``.

As a tree transform: :meth:`Subspace.init` adds ``subspace/z`` (zeros: the run starts at
``θ0``) and ``P``'s random constants under ``subspace/``; only ``z`` trains.
:meth:`Subspace.apply` adds ``P·z`` to the projected leaves (sorted by path, raveled and
concatenated) and runs the plain model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp

from research import tree
from research.methods import Applied, Method, register

SCOPE = "subspace"
Z = f"{SCOPE}/z"
PROJECTIONS = ("fastfood", "sparse")
# P's random constants are frozen leaves rather than redrawn from the seed in every step:
# redrawing Π means a sort of D keys per step, and a checkpoint's z only means something with
# its own P, which a change of JAX's PRNG bits would silently replace. The price is about
# 9 bytes (fastfood) or 5·nonzeros bytes (sparse) per projected parameter, with no optimizer
# state, gradient or sharding rule of their own.
CONSTANTS = {"fastfood": ("signs", "permutation", "gaussian", "scale"),
             "sparse": ("indices", "signs")}


# ---------------------------------------------------------------------------------------------
# The projections, as functions of z and their constants
# ---------------------------------------------------------------------------------------------


def fwht(x):
    """Unnormalised Walsh–Hadamard transform over the last axis (a power of two long):
    Sylvester's ``H = H_2 ⊗ … ⊗ H_2``, one butterfly pass per factor."""
    n, lead = x.shape[-1], x.shape[:-1]
    half = 1
    while half < n:
        pairs = x.reshape(*lead, n // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        half *= 2
    return x


def block_width(dim: int) -> int:
    """``2^ceil(log2 dim)``: the size of one Fastfood block."""
    return 1 << (dim - 1).bit_length()


def fastfood_constants(key, total: int, dim: int) -> dict:
    width = block_width(dim)
    blocks = -(-total // width)
    k_sign, k_perm, k_gauss = jax.random.split(key, 3)
    gaussian = jax.random.normal(k_gauss, (blocks, width), jnp.float32)
    # Every column of H G Π H B has norm sqrt(width)·||G|| (H B keeps ±1 entries, H scales
    # norms by sqrt(width)), so S = 1 / (||G_i||·sqrt(D)) gives each block's columns norm
    # sqrt(width/D) and the D rows of the stack ~unit columns, as Li et al. and Aghajanyan et
    # al.'s code normalise. Le et al.'s chi-distributed S only shapes the row norms, which a
    # subspace does not care about (and its gamma sampler is slow to compile).
    return {
        "signs": jnp.where(jax.random.bernoulli(k_sign, 0.5, (blocks, width)), 1, -1
                           ).astype(jnp.int8),
        # argsort of uniform keys: one batched sort, where jax.random.permutation per block
        # compiles several rounds of them.
        "permutation": jnp.argsort(jax.random.uniform(k_perm, (blocks, width)), axis=-1
                                   ).astype(jnp.int32),
        "gaussian": gaussian,
        "scale": 1.0 / (jnp.linalg.norm(gaussian, axis=-1, keepdims=True) * math.sqrt(total)),
    }


def fastfood(z, signs, permutation, gaussian, scale, total: int):
    """``P·z`` (length ``total``) for the stacked Fastfood blocks."""
    width = signs.shape[-1]
    x = jnp.pad(z.astype(jnp.float32), (0, width - z.shape[0]))
    x = fwht(signs * x)                                   # every block reads the same z
    x = jnp.take_along_axis(x, permutation, axis=-1)
    x = fwht(gaussian * x)
    return (scale * x).reshape(-1)[:total]


def sparse_constants(key, total: int, dim: int, nonzeros: int) -> dict:
    k_index, k_sign = jax.random.split(key)
    return {
        "indices": jax.random.randint(k_index, (total, nonzeros), 0, dim, jnp.int32),
        "signs": jnp.where(jax.random.bernoulli(k_sign, 0.5, (total, nonzeros)), 1, -1
                           ).astype(jnp.int8),
    }


def sparse(z, indices, signs):
    """``P·z`` with ``nonzeros`` entries ``±c`` per row: a column collects ``D·nonzeros/d``
    of them on average, so ``c = sqrt(d / (D·nonzeros))`` gives it unit norm."""
    total, nonzeros = indices.shape
    c = math.sqrt(z.shape[0] / (total * nonzeros))
    return c * jnp.sum(z.astype(jnp.float32)[indices] * signs, axis=-1)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@register("subspace")
@dataclasses.dataclass(frozen=True)
class Subspace(Method):
    """Subspace options (``config.method = dict(name='subspace', ...)``).

    dim: ``d``, the number of trained coordinates.
    projection: 'fastfood' or 'sparse'.
    seed: draws ``P`` (the same seed gives the same ``P`` for the same projected shapes).
    targets: ``(regex, bool)`` rules choosing the projected model leaves, first match wins;
        the rest stay frozen at ``θ0``. Default: every model leaf.
    nonzeros: entries per row of the sparse projection.
    """

    dim: int = 1000
    projection: str = "fastfood"
    seed: int = 0
    targets: tuple = ((r".*", True),)
    nonzeros: int = 4

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", tuple(tuple(rule) for rule in self.targets))
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"Subspace dim={self.dim!r} (config.method.dim) is not a "
                             f"positive integer")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"Subspace projection={self.projection!r} (config.method."
                             f"projection) is not one of {PROJECTIONS}")
        if not isinstance(self.nonzeros, int) or self.nonzeros <= 0:
            raise ValueError(f"Subspace nonzeros={self.nonzeros!r} (config.method.nonzeros) "
                             f"is not a positive integer")
        set_(self, "trainable", (Z,) if self.trainable is None else tuple(self.trainable))

    def projected(self, params) -> dict[str, tuple]:
        """``{path: shape}`` of the projected model leaves, in the order ``P``'s rows take."""
        flat = {p: x for p, x in tree.flatten(params).items()
                if not p.startswith(SCOPE + tree.SEP)}
        chosen = tree.resolve_rules(self.targets, sorted(flat), default=False,
                                    what="Subspace target rule")
        return {p: tuple(flat[p].shape) for p, keep in chosen.items() if keep}

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` plus ``subspace/z`` (zeros) and ``P``'s constants, drawn from ``seed``."""
        del rng, stats
        if SCOPE in params:
            raise ValueError(f"params already have a {SCOPE!r} subtree (Subspace.init twice?)")
        total = sum(math.prod(s) for s in self.projected(params).values())
        if self.dim > total:
            raise ValueError(f"Subspace dim={self.dim} (config.method.dim) exceeds the {total} "
                             f"projected parameters")
        key = jax.random.key(self.seed)
        constants = (fastfood_constants(key, total, self.dim) if self.projection == "fastfood"
                     else sparse_constants(key, total, self.dim, self.nonzeros))
        return {**params, SCOPE: {"z": jnp.zeros((self.dim,), jnp.float32), **constants}}

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """``z`` and the constants are replicated."""
        own = {name: (None,) * len(x.shape) for name, x in shapes[SCOPE].items()}
        return {**logical, SCOPE: own}

    def update(self, params) -> dict:
        """``P·z`` as a tree over the projected leaves (float32)."""
        own, paths = params.get(SCOPE), self.projected(params)
        names = ("z", *CONSTANTS[self.projection])
        if own is None or any(name not in own for name in names):
            raise ValueError(f"Subspace ({self.projection}) needs "
                             f"{', '.join(f'{SCOPE}/{n}' for n in names)} in the params "
                             f"(run Subspace.init first)")
        total = sum(math.prod(s) for s in paths.values())
        if self.projection == "fastfood":
            covered = math.prod(own["signs"].shape)
            if not total <= covered < total + own["signs"].shape[-1]:
                raise ValueError(f"Subspace fastfood constants {own['signs'].shape} were made "
                                 f"for other projected leaves than these {total} parameters")
            flat = fastfood(own["z"], *(own[n] for n in CONSTANTS["fastfood"]), total)
        else:
            if own["indices"].shape[0] != total:
                raise ValueError(f"Subspace sparse constants cover {own['indices'].shape[0]} "
                                 f"parameters; the projected leaves have {total}")
            flat = sparse(own["z"], own["indices"], own["signs"])
        offsets = [0, *itertools.accumulate(math.prod(s) for s in paths.values())]
        return tree.unflatten({path: flat[start:stop].reshape(shape) for (path, shape), start, stop
                               in zip(paths.items(), offsets, offsets[1:])})

    def merge(self, params) -> dict:
        """``θ0 + P·z``: the plain model's params, the method's own leaves dropped."""
        delta = tree.flatten(self.update(params))
        flat = {p: x for p, x in tree.flatten(params).items()
                if not p.startswith(SCOPE + tree.SEP)}
        return tree.unflatten({p: (x + delta[p]).astype(x.dtype) if p in delta else x
                               for p, x in flat.items()})

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        return Applied(module.apply({**variables, "params": self.merge(variables["params"])},
                                    *args, **kwargs))

    def export(self, params: dict) -> dict:
        return self.merge(params)

