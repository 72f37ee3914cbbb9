"""Magnitude pruning, and the sparse regularisation that prepares a model for it.

Sparse then Prune (Prasetyo et al., 2023, "Sparse then Prune: Toward Efficient Vision
Transformers"): train with an L1 penalty ``λ·Σ|θ|`` on the chosen weights so that many of them
drift to zero, then zero the smallest magnitudes (Han et al., 2015, "Learning both Weights and
Connections for Efficient Neural Networks"); pruning then removes little the model still uses.
The penalty may instead be group-L1 ``λ·Σ_g ‖θ_g‖₂`` (Yuan & Lin, 2006, the group lasso) over
attention heads and MLP channels, which empties whole groups.

:func:`magnitude_prune` keeps the largest entries of the leaves its rules select, ranked across
all leaves that share a density (``scope='global'``) or within each leaf (``scope='leaf'``);
:class:`SparseRegularised` (``config.method.name='sparse_reg'``) adds the penalty as a loss term.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from research import tree as tree_lib
from research.methods import Applied, Method, register
from research.sparse import masks as masks_lib

# The kernels of the transformer blocks: what Sparse then Prune regularises and prunes.
BLOCK_KERNELS = r"(encoder|decoder)/layer_\d+/.*/kernel"
DEFAULT_TARGETS = ((BLOCK_KERNELS, True),)
SCOPES = ("global", "leaf")
# Group-L1 groups: one attention head, or one MLP channel (hidden unit), per index of this axis.
HEADS_AND_CHANNELS = ((r".*/attn/(query|key|value)/kernel", 1),  # [embed, heads, head_dim]
                      (r".*/attn/out/kernel", 0),                # [heads, head_dim, embed]
                      (r".*/mlp/(wi|gate|up)/kernel", 1),        # [embed, mlp]
                      (r".*/mlp/(wo|down)/kernel", 0))           # [mlp, embed]


def block_kernels(density: float) -> tuple:
    """Rules pruning every block kernel to ``density``."""
    return ((BLOCK_KERNELS, density),)


def magnitude_prune(params: dict, rules, *, scope: str = "global") -> tuple[dict, dict]:
    """``(pruned params, mask)``: in each leaf a rule ``(regex, density)`` selects, only the
    ``density`` share of entries with the largest ``|θ|`` is kept (exactly
    ``max(1, int(density·n))`` of ``n``, ties broken by position) and the rest set to zero.
    With ``scope='global'`` the ``n`` entries are all those of the leaves sharing that density,
    ranked together, so some leaves keep more than others; with ``'leaf'``, each leaf alone.
    A rule with density None leaves what it matches unpruned (to exclude a leaf before a broader
    rule). The mask is True where an entry is kept: a boolean array for each pruned leaf and
    Python True for every other leaf."""
    if scope not in SCOPES:
        raise ValueError(f"magnitude_prune: scope={scope!r} is not one of {SCOPES}")
    for pattern, density in rules:
        if density is not None:
            masks_lib.check_density(density, f"prune rule {pattern!r}: density")
    flat = tree_lib.flatten(params)
    chosen = tree_lib.resolve_rules(rules, flat, what="prune rule")
    groups: dict[tuple, list[str]] = {}
    for path, density in chosen.items():
        if density is not None:
            groups.setdefault((density, path if scope == "leaf" else None), []).append(path)
    mask: dict = {path: True for path in flat}
    for (density, _), paths in groups.items():
        scores = tree_lib.unflatten({path: np.asarray(flat[path]) for path in paths})
        mask.update(tree_lib.flatten(masks_lib.top_k(scores, density=density)))
    pruned = {path: value if mask[path] is True else jnp.where(mask[path], value, 0)
              for path, value in flat.items()}
    return tree_lib.unflatten(pruned), tree_lib.unflatten(mask)


def sparsity_penalty(params: dict, targets, group_axes=()) -> jnp.ndarray:
    """``Σ|θ|`` over the leaves ``targets`` (``(regex, True)`` rules) select, in float32; a
    selected leaf that ``group_axes`` (``(regex, axis)`` rules) gives an axis contributes
    ``Σ_g ‖θ_g‖₂`` instead, one group per index of that axis."""
    flat = tree_lib.flatten(params)
    selected = tree_lib.resolve_rules(targets, flat, default=False, what="sparse_reg target")
    axes = tree_lib.resolve_rules(group_axes, flat, what="sparse_reg group_axes rule")
    total = jnp.zeros((), jnp.float32)
    for path in (p for p in flat if selected[p] is True):
        value, axis = flat[path].astype(jnp.float32), axes[path]
        if axis is None:
            total += jnp.sum(jnp.abs(value))
        else:
            others = tuple(a for a in range(value.ndim) if a != axis % value.ndim)
            total += jnp.sum(jnp.sqrt(jnp.sum(value * value, axis=others)))
    return total


@register("sparse_reg")
@dataclasses.dataclass(frozen=True)
class SparseRegularised(Method):
    """``config.method = dict(name='sparse_reg', strength=1e-4)``: full training plus the loss
    term ``sparsity = strength · penalty`` (:func:`sparsity_penalty`).

    strength: λ, the penalty's weight (>= 0).
    targets: ``(regex, True)`` rules over param paths; default: every block kernel.
    group_axes: ``(regex, axis)`` rules; the target leaves they match are penalised by group-L1
        over that axis (:data:`HEADS_AND_CHANNELS`: heads and MLP channels), the rest by L1.
    """

    strength: float = 1e-4
    targets: tuple = DEFAULT_TARGETS
    group_axes: tuple = ()

    def __post_init__(self):
        if not self.strength >= 0:
            raise ValueError(f"config.method.strength={self.strength!r} must be >= 0")
        object.__setattr__(self, "targets", tuple(tuple(rule) for rule in self.targets))
        object.__setattr__(self, "group_axes", tuple(tuple(rule) for rule in self.group_axes))

    def init(self, rng, params: dict, stats=None) -> dict:
        # Traced once at setup (under eval_shape), so a rule that matches nothing fails there.
        sparsity_penalty(params, self.targets, self.group_axes)
        return super().init(rng, params, stats)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        outputs = module.apply(variables, *args, **kwargs)
        penalty = sparsity_penalty(variables["params"], self.targets, self.group_axes)
        return Applied(outputs, {"sparsity": self.strength * penalty})
