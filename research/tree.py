"""Parameter trees: the one data structure every Scion method speaks.

A model's parameters are a plain nested dict of arrays. Each leaf has a path name such as
``encoder/layer_3/attn/query/kernel``. Methods select leaves with ordered ``(regex, value)``
rules (first match wins, as in big_vision), combine trees with simple algebra, and split them
into trainable and frozen parts. Errors name the path and, for a rule that selects nothing,
the closest path names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

Tree = Mapping[str, Any]
Rules = Sequence[tuple[str, Any]]
SEP = "/"


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{path: leaf}`` in insertion order."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: leaf}`` -> nested dict (inverse of :func:`flatten`)."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split(SEP)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} passes through leaf {part!r}")
        node[name] = leaf
    return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> dict[str, Any]:
    """Apply ``fn(path, leaf)`` to every leaf, keeping the structure."""
    return unflatten({path: fn(path, leaf) for path, leaf in flatten(tree).items()})


def closest_paths(name: str, paths: Iterable[str], count: int = 3) -> list[str]:
    """Path names most similar to ``name`` (for "did you mean" messages)."""
    paths = list(paths)
    close = difflib.get_close_matches(name, paths, n=count, cutoff=0.0)
    return close or paths[:count]


# ---------------------------------------------------------------------------------------------
# Rules: ordered (regex, value), first full match wins
# ---------------------------------------------------------------------------------------------


def _compile(rules: Rules) -> list[tuple[re.Pattern, Any]]:
    compiled = []
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"a rule must be (regex, value), got {entry!r}")
        pattern, value = entry
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as err:
            raise ValueError(f"rule regex {pattern!r} is invalid: {err}") from None
    return compiled


def resolve_rules(rules: Rules, paths: Iterable[str], *, default: Any = None,
                  what: str = "rule", require_match: bool = True) -> dict[str, Any]:
    """Map each path to the value of the first rule whose regex fully matches it.

    Paths no rule matches get ``default``. A rule that matches no path at all is a mistake
    (a typo in a config silently selecting nothing), so it raises and lists the closest paths.
    """
    paths = list(paths)
    compiled = _compile(rules)
    used = [False] * len(compiled)
    resolved = {}
    for path in paths:
        resolved[path] = default
        for index, (pattern, value) in enumerate(compiled):
            if pattern.fullmatch(path):
                resolved[path] = value
                used[index] = True
                break
    if require_match:
        for (pattern, _), was_used in zip(compiled, used):
            if not was_used and not any(pattern.fullmatch(p) for p in paths):
                near = ", ".join(closest_paths(pattern.pattern, paths))
                raise ValueError(f"{what} {pattern.pattern!r} matches no parameter; closest: {near}")
    return resolved


def rule_tuples(rules) -> tuple:
    """``rules`` as a tuple of tuples (a config gives lists, which are not hashable)."""
    return tuple(tuple(rule) if isinstance(rule, list) else rule for rule in (rules or ()))


def choice_rules(rules, what: str) -> tuple:
    """``(regex, chosen)`` rules from such rules or bare regexes (each choosing its matches),
    as a method's ``targets`` take them: an exclusion ``(regex, False)`` may precede a broad
    regex. Anything else is a one-line error naming ``what``."""
    out = []
    for rule in rules or ():
        if isinstance(rule, str):
            out.append((rule, True))
        elif isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
            out.append((rule[0], bool(rule[1])))
        else:
            raise ValueError(f"{what} {rule!r} is neither a regex nor a (regex, bool) rule")
    return tuple(out)


def tree_from_rules(rules: Rules, tree: Tree, *, default: Any = None, what: str = "rule",
                    require_match: bool = True) -> dict[str, Any]:
    """A tree of per-leaf values chosen by ``rules`` over the leaves' path names."""
    return unflatten(resolve_rules(rules, flatten(tree), default=default, what=what,
                                   require_match=require_match))


def mask_from_patterns(patterns: Sequence[str], tree: Tree, *, what: str = "pattern") -> dict:
    """Boolean tree: True where any pattern fully matches the leaf's path."""
    return tree_from_rules([(p, True) for p in patterns], tree, default=False, what=what)


# ---------------------------------------------------------------------------------------------
# Structure checks and diffs
# ---------------------------------------------------------------------------------------------


def _shape(leaf) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


def _dtype(leaf) -> str:
    return str(getattr(leaf, "dtype", type(leaf).__name__))


def check_same_structure(a: Tree, b: Tree, *, check_shapes: bool = True) -> None:
    """Raise naming the first path where ``a`` and ``b`` differ (keys, then shapes)."""
    flat_a, flat_b = flatten(a), flatten(b)
    for path in flat_a:
        if path not in flat_b:
            raise ValueError(f"trees differ at {path!r}: present in the first tree only")
        if check_shapes and _shape(flat_a[path]) != _shape(flat_b[path]):
            raise ValueError(f"trees differ at {path!r}: shape {_shape(flat_a[path])} "
                             f"vs {_shape(flat_b[path])}")
    for path in flat_b:
        if path not in flat_a:
            raise ValueError(f"trees differ at {path!r}: present in the second tree only")


def structural_diff(old: Tree, new: Tree) -> dict[str, list]:
    """What changed between two trees: added and removed paths, and leaves whose shape or
    dtype changed (``(path, old, new)``)."""
    flat_old, flat_new = flatten(old), flatten(new)
    changed_shape, changed_dtype = [], []
    for path in flat_old.keys() & flat_new.keys():
        if _shape(flat_old[path]) != _shape(flat_new[path]):
            changed_shape.append((path, _shape(flat_old[path]), _shape(flat_new[path])))
        if _dtype(flat_old[path]) != _dtype(flat_new[path]):
            changed_dtype.append((path, _dtype(flat_old[path]), _dtype(flat_new[path])))
    return {
        "added": [p for p in flat_new if p not in flat_old],
        "removed": [p for p in flat_old if p not in flat_new],
        "changed_shape": sorted(changed_shape),
        "changed_dtype": sorted(changed_dtype),
    }


# ---------------------------------------------------------------------------------------------
# Algebra
# ---------------------------------------------------------------------------------------------


def _zip_map(fn, *trees: Tree) -> dict:
    for other in trees[1:]:
        check_same_structure(trees[0], other)
    flats = [flatten(t) for t in trees]
    return unflatten({path: fn(*(f[path] for f in flats)) for path in flats[0]})


def add(a: Tree, b: Tree) -> dict:
    return _zip_map(jnp.add, a, b)


def sub(a: Tree, b: Tree) -> dict:
    return _zip_map(jnp.subtract, a, b)


def scale(tree: Tree, factor) -> dict:
    return map_with_path(lambda _, x: x * factor, tree)


def lerp(a: Tree, b: Tree, t) -> dict:
    """``(1 - t) * a + t * b`` leaf by leaf."""
    return _zip_map(lambda x, y: x + t * (y - x), a, b)


def dot(a: Tree, b: Tree) -> jax.Array:
    """Sum over leaves of the elementwise product, in float32."""
    flat_a, flat_b = flatten(a), flatten(b)
    check_same_structure(a, b)
    return sum((jnp.vdot(flat_a[p].astype(jnp.float32), flat_b[p].astype(jnp.float32))
                for p in flat_a), jnp.zeros((), jnp.float32))


def norm(tree: Tree) -> jax.Array:
    return jnp.sqrt(dot(tree, tree))


def cosine(a: Tree, b: Tree, eps: float = 1e-12) -> jax.Array:
    return dot(a, b) / jnp.maximum(norm(a) * norm(b), eps)


def count(tree: Tree) -> int:
    """Number of scalar entries in a tree."""
    return sum(int(getattr(x, "size", 1)) for x in flatten(tree).values())


# ---------------------------------------------------------------------------------------------
# Trainable / frozen split
# ---------------------------------------------------------------------------------------------


def split(tree: Tree, trainable: Tree) -> tuple[dict, dict]:
    """Split by a boolean tree into ``(trainable, frozen)``; each keeps only its own leaves,
    so frozen leaves never reach ``jax.grad`` or the optimizer."""
    flat, flags = flatten(tree), flatten(trainable)
    check_same_structure(tree, trainable, check_shapes=False)
    return (unflatten({p: x for p, x in flat.items() if flags[p]}),
            unflatten({p: x for p, x in flat.items() if not flags[p]}))


def combine(trainable: Tree, frozen: Tree) -> dict:
    """Inverse of :func:`split`. Overlapping paths are an error."""
    flat_t, flat_f = flatten(trainable), flatten(frozen)
    both = flat_t.keys() & flat_f.keys()
    if both:
        raise ValueError(f"path {sorted(both)[0]!r} is in both the trainable and frozen trees")
    return unflatten({**flat_t, **flat_f})


# ---------------------------------------------------------------------------------------------
# The layer view: per-layer paths as a scanned stack sees them
# ---------------------------------------------------------------------------------------------

# A scanned stack (``ModelConfig.scan_layers``) traces one block for all its layers, so code
# running inside it sees ``encoder/layer_*/attn/query`` where the tree says ``layer_3``.
ANY_LAYER = "layer_*"
_LAYER = re.compile(r"(?<![^/])layer_\d+(?![^/])")


def layer_view(path: str) -> str:
    """``encoder/layer_3/attn/query`` -> ``encoder/layer_*/attn/query``."""
    return _LAYER.sub(ANY_LAYER, path)


def with_layer_view(by_path: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """``by_path`` plus a ``layer_view`` key for every path inside a layer, which a scanned
    stack can look up. Layers must agree: a scanned block cannot give layer 3 a value of its
    own, so differing values are an error naming both paths."""
    viewed = dict(by_path)
    first: dict[str, str] = {}
    for path, value in by_path.items():
        view = layer_view(path)
        if view == path:
            continue
        if view in first and viewed[view] != value:
            raise ValueError(f"config.model.scan_layers: {what} differs between layers "
                             f"({first[view]}: {viewed[view]!r}, {path}: {value!r}); a scanned "
                             f"stack runs one block for every layer, so set "
                             f"config.model.scan_layers=False")
        first.setdefault(view, path)
        viewed[view] = value
    return viewed
