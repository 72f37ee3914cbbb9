"""Many LoRA adapters over one base (LoRA: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"; serving a mixed batch as in S-LoRA, Sheng et al., 2023, "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters", and Punica, Chen et al., 2023, "Punica: Multi-Tenant
LoRA Serving"): adapters live apart from the base, several can be active at once, and one
compiled forward serves a batch whose rows each pick their own adapter.

The factors keep lora.py's layout (A = [*inputs, r], B = [r, *outputs]) in three trees:

* **one adapter, apart from its base**: ``{module}/lora_a``, ``{module}/lora_b`` only (what
  ``lora_factors`` returns). On disk it is ``adapter.safetensors`` plus ``adapter.json`` (the
  LoRA options, which rebuild the scales). :func:`attach` puts it back on a base, checking
  that every factor fits its kernel; :func:`detach` takes it off again.
* **several named adapters, all active** (:class:`MultiLoRA`): ``{module}/lora/{name}/a`` and
  ``.../b``, and the layer computes ``x·W + Σ_i w_i·s_i·(x·A_i)·B_i``. The leaves are ``a``
  and ``b`` under a ``lora`` subtree rather than ``lora_a@name``-style names: plain LoRA's
  ``factor_pairs`` and ``FACTOR_PATTERN`` look only for a last path component ``lora_a`` or
  ``lora_b``, so they neither apply these nor complain that no kernel sits beside them; and
  each adapter is a subtree, so a rule like ``.*/lora/chat/.*`` selects it (to train, freeze or
  shard one adapter).
* **N adapters stacked for a mixed batch** (:func:`stack_adapters`, :func:`mixed_apply`):
  ``{module}/a [N, *inputs, R]``, ``{module}/b [N, R, *outputs]`` and ``{module}/scale [N]``;
  ranks are zero-padded to the largest ``R`` (padding adds exact zeros to the product), and an
  adapter that leaves a module alone gets zero factors and scale 0 there. Row ``b`` of the batch
  uses adapter ``adapter_ids[b]``; -1 runs the base alone. Ids, factors and scales are all
  traced arrays, so one compilation serves every mix of the same N, modules and shapes.

Usage::

    save_adapter("runs/sql/adapter", lora_method, params)   # params: base + factors
    method, adapter = load_adapter("runs/sql/adapter")
    outputs = method.apply(model.module, {"params": attach(base, adapter)}, **inputs).outputs

    both = MultiLoRA(adapters=(("sql", method), ("chat", chat_method)), weights=(1.0, 0.5))
    params = attach(attach(base, adapter, "sql"), chat_adapter, "chat")
    outputs = both.apply(model.module, {"params": params}, **inputs).outputs

    stacked = stack_adapters(base, [load_adapter(d) for d in directories])
    serve = jax.jit(mixed_apply, static_argnums=0)
    outputs = serve(model.module, base, stacked, adapter_ids, **inputs)  # ids: int [batch]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from research import files, sites, tree
from research.lowrank.lora import A, B, FACTOR_PATTERN, TARGET_LEAVES, LoRA, lora_factors, low_rank
from research.models.dropout import dropout
from research.lowrank.lora import merge as merge_lora
from research.methods import Applied, Method, register, training

CONFIG, WEIGHTS = "adapter.json", "adapter.safetensors"
FORMAT = "scion-lora-adapter/1"
ADAPTERS = "lora"  # the subtree holding named adapters: {module}/lora/{name}/a|b
_NAMED = re.compile(rf"(?:(.*)/)?{ADAPTERS}/([^/]+)/(a|b)")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ---------------------------------------------------------------------------------------------
# One adapter: save, load, attach, detach
# ---------------------------------------------------------------------------------------------


def save_adapter(directory: str, method: LoRA, params) -> None:
    """Write ``params``' LoRA factors (not the base) and ``method``'s options to ``directory``
    (``adapter.safetensors`` + ``adapter.json``), staged then renamed, so a failed write leaves
    no partial directory."""
    if type(method) is not LoRA:  # a LoRA variant may hold leaves besides the factors
        raise ValueError(f"save_adapter saves LoRA adapters; got {type(method).__name__}")
    adapter, _ = lora_factors(params, method)
    tensors = {path: np.ascontiguousarray(value) for path, value in tree.flatten(adapter).items()}
    if not tensors:
        raise ValueError("save_adapter: params hold no LoRA factors")
    options = {field.name: getattr(method, field.name) for field in dataclasses.fields(method)}
    text = json.dumps({"format": FORMAT, "lora": options}, indent=2)

    def write_config(path):
        with open(path, "w") as file:
            file.write(text)
    files.write_atomically(directory, {WEIGHTS: lambda path: safetensors.numpy.save_file(tensors, path),
                                  CONFIG: write_config})


def load_adapter(directory: str) -> tuple[LoRA, dict]:
    """``(method, adapter)`` as :func:`save_adapter` wrote them; :func:`attach` the adapter to a
    base before ``method.apply``."""
    config_path, weights_path = (os.path.join(directory, name) for name in (CONFIG, WEIGHTS))
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
    with open(config_path) as file:
        config = json.load(file)
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format={config.get('format')!r}; expected {FORMAT!r}")
    try:
        method = LoRA(**config["lora"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    flat = safetensors.numpy.load_file(weights_path)
    _by_module(flat, what=weights_path)
    return method, tree.unflatten({path: jnp.asarray(value) for path, value in flat.items()})


def _by_module(flat_adapter: Mapping, what: str = "adapter") -> dict[str, tuple]:
    """``{module: (a, b)}`` of a plain adapter; anything else in it is an error."""
    modules = {}
    for path in flat_adapter:
        module, _, leaf = path.rpartition(tree.SEP)
        if leaf not in (A, B):
            raise ValueError(f"{what}: leaf {path!r} is not a LoRA factor ({A} or {B})")
        for name in (A, B):
            if sites.join(module, name) not in flat_adapter:
                raise ValueError(f"{what}: factor {path!r} has no partner {sites.join(module, name)!r}")
        modules[module] = (flat_adapter[sites.join(module, A)], flat_adapter[sites.join(module, B)])
    return modules


def attach(params, adapter, name: str | None = None) -> dict:
    """``params`` with ``adapter``'s factors beside their kernels: as ``lora_a``/``lora_b`` (for
    LoRA), or as ``lora/{name}/a|b`` (for :class:`MultiLoRA`). A module missing from ``params``
    or a factor that does not fit its kernel is a one-line error naming the module."""
    if name is not None and not _NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is not a plain path component "
                         f"({_NAME.pattern})")
    flat = dict(tree.flatten(params))
    targets = {sites.parent(p): p for p in flat if p.rpartition(tree.SEP)[2] in TARGET_LEAVES}
    for module, (a, b) in _by_module(tree.flatten(adapter)).items():
        if module not in targets:
            near = ", ".join(tree.closest_paths(module, targets))
            raise ValueError(f"adapter module {module!r} has no kernel or embedding in the base; "
                             f"closest: {near}")
        target = targets[module]
        shape, made = tuple(flat[target].shape), (*a.shape[:-1], *b.shape[1:])
        if a.shape[-1] != b.shape[0] or made != shape:
            raise ValueError(f"adapter for {module}: {A} {tuple(a.shape)} and {B} "
                             f"{tuple(b.shape)} make {made}; the base's {target} is {shape}")
        paths = ((sites.join(module, A), sites.join(module, B)) if name is None else
                 (sites.join(module, ADAPTERS, name, "a"), sites.join(module, ADAPTERS, name, "b")))
        for path, value in zip(paths, (a, b)):
            if path in flat:
                raise ValueError(f"{path!r} is already in params; detach it first")
            flat[path] = value
    return tree.unflatten(flat)


def detach(params, name: str | None = None) -> tuple[dict, dict]:
    """Inverse of :func:`attach`: ``(params without the adapter, the adapter)`` for the plain
    factors (``name`` None) or adapter ``name``; the adapter is ``{}`` when absent."""
    rest, adapter = {}, {}
    for path, value in tree.flatten(params).items():
        match = _NAMED.fullmatch(path)
        if name is None and re.fullmatch(FACTOR_PATTERN, path):
            adapter[path] = value
        elif name is not None and match and match.group(2) == name:
            adapter[sites.join(match.group(1), A if match.group(3) == "a" else B)] = value
        else:
            rest[path] = value
    return tree.unflatten(rest), tree.unflatten(adapter)


def adapter_names(params) -> list[str]:
    """Names of the adapters in ``params`` (``lora/{name}`` subtrees), in path order."""
    names = [m.group(2) for m in map(_NAMED.fullmatch, tree.flatten(params)) if m]
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# The low-rank paths, added at intercepted layers
# ---------------------------------------------------------------------------------------------


def _apply_with(module, variables, args, kwargs, modules, delta):
    """``module.apply`` with ``delta(layer, path, inputs, input_axes)`` added to the output of
    each Dense, MultiAxisDense and Embed call at a path in ``modules``. A path never reached is
    an error: its factors would silently do nothing."""
    called = set()

    def add(call: sites.Call):
        y = call.output()
        if call.path not in modules:
            return y
        return y + delta(call.layer, call.path, call.inputs, call.input_axes).astype(y.dtype)

    with sites.intercept(add, lambda layer: isinstance(layer, sites.LAYERS), seen=called):
        outputs = module.apply(variables, *args, **kwargs)
    sites.check_reached(modules, called, what="adapter factors", called=called)
    return outputs


def _check_axes(path, a, n_in, leading=0):
    if a.ndim - 1 - leading != n_in:
        raise ValueError(f"adapter factor A at {path} {tuple(a.shape)} has "
                         f"{a.ndim - 1 - leading} input axes; the layer's kernel has {n_in}")


# ---------------------------------------------------------------------------------------------
# Several adapters at once
# ---------------------------------------------------------------------------------------------


@register("multi_lora")
@dataclasses.dataclass(frozen=True)
class MultiLoRA(Method):
    """Named LoRA adapters, all active (``config.method = dict(name='multi_lora', ...)``).

    adapters: ordered entries, each a name or ``(name, LoRA or dict of LoRA options)``; the
        entry's options override ``lora``. Params may hold more adapters; only these apply.
    lora: LoRA options every adapter starts from (targets, alpha, alpha_rules, rslora, ...).
    weights: per-adapter multipliers ``w_i`` of the scaled updates (default 1 each).
    trainable: default: these adapters' factors and every adapter's ``also_train``.
    """

    scannable: ClassVar[bool] = False  # its sites are keyed by layer path

    adapters: tuple = ()
    lora: Mapping = dataclasses.field(default_factory=dict, compare=False)  # folded into adapters
    weights: tuple = ()

    def __post_init__(self):
        set_ = object.__setattr__
        entries = []
        for entry in self.adapters:
            name, options = (entry, {}) if isinstance(entry, str) else tuple(entry)
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"MultiLoRA adapter name {name!r} is not a plain path "
                                 f"component ({_NAME.pattern})")
            if not isinstance(options, LoRA):
                try:
                    options = LoRA(**{**dict(self.lora or {}), **dict(options)})
                except (TypeError, ValueError) as err:
                    raise ValueError(f"MultiLoRA adapter {name!r}: {err}") from None
            entries.append((name, options))
        names = [name for name, _ in entries]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"MultiLoRA adapters={names} must be distinct names, at least one")
        weights = tuple(float(w) for w in self.weights) or (1.0,) * len(names)
        if len(weights) != len(names):
            raise ValueError(f"MultiLoRA weights={list(weights)} needs one weight per adapter "
                             f"{names}")
        set_(self, "adapters", tuple(entries))
        set_(self, "weights", weights)
        if self.trainable is None:
            alternatives = "|".join(map(re.escape, names))
            also = dict.fromkeys(p for _, lora in entries for p in lora.also_train)
            set_(self, "trainable", (rf"(.*/)?{ADAPTERS}/({alternatives})/(a|b)", *also))
        else:
            set_(self, "trainable", tuple(self.trainable))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)

    def scales(self, params) -> dict[str, dict]:
        """``{name: scale tree}``: ``w_i·s_i`` at each path adapter ``name`` adapts (the scale
        trees ``merge`` takes)."""
        present, scales = adapter_names(params), {}
        for (name, lora), weight in zip(self.adapters, self.weights):
            rest, adapter = detach(params, name)
            if not adapter:
                raise ValueError(f"MultiLoRA adapter {name!r} has no factors in params; params "
                                 f"hold adapters {present}")
            scales[name] = tree.scale(lora.scales(attach(rest, adapter)), weight)
        return scales

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with each adapter's factors (LoRA's init, one rng per adapter); factors
        already present are kept."""
        del stats
        plain = [p for p in tree.flatten(params) if re.fullmatch(FACTOR_PATTERN, p)]
        if plain:
            raise ValueError(f"MultiLoRA: params hold plain LoRA factors ({plain[0]!r}); "
                             f"attach them under a name")
        for index, (name, lora) in enumerate(self.adapters):
            rest, own = detach(params, name)
            grown = lora.init(jax.random.fold_in(rng, index), attach(rest, own))
            params = attach(*detach(grown), name)
        return params

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """A takes the kernel's input axes, B its output axes; the rank axis has no name."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for path in flat_shapes:
            match = _NAMED.fullmatch(path)
            if not match:
                continue
            module, name, which = match.groups()
            targets = [sites.join(module, leaf) for leaf in TARGET_LEAVES
                       if sites.join(module, leaf) in flat_shapes]
            if len(targets) != 1:
                raise ValueError(f"adapter factor {path!r} needs exactly one of "
                                 f"{'/'.join(TARGET_LEAVES)} beside {ADAPTERS}/; found {targets}")
            target = targets[0]
            axes = tuple(flat_logical.get(target) or ())
            axes += (None,) * (len(flat_shapes[target].shape) - len(axes))
            n_in = len(flat_shapes[sites.join(module, ADAPTERS, name, "a")].shape) - 1
            flat_logical[path] = (*axes[:n_in], None) if which == "a" else (None, *axes[n_in:])
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with every listed adapter's low-rank path added; dropout on those
        paths (each adapter's ``dropout``) is on in training (``deterministic=False``)."""
        active = {}  # module path -> [(adapter, w·s, dropout rate)] in adapter order
        for (name, lora), scales in zip(self.adapters, self.scales(variables["params"]).values()):
            for target, scale in tree.flatten(scales).items():
                rate = lora.dropout if training(kwargs) else 0.0
                active.setdefault(sites.parent(target), []).append((name, float(scale), rate))

        def delta(layer, path, inputs, n_in):
            factors = layer.get_variable("params", ADAPTERS)
            total = 0.0
            for name, scale, rate in active[path]:
                a, b = factors[name]["a"], factors[name]["b"]
                dtype = sites.compute_dtype_of(layer, inputs, a)
                if n_in == 0:
                    rows = jnp.take(a, inputs, axis=0).astype(dtype)
                    total = total + jnp.tensordot(rows * scale, b.astype(dtype), 1)
                    continue
                _check_axes(path, a, n_in)
                x = inputs.astype(dtype)
                if rate:
                    x = dropout(layer.make_rng("dropout"), rate, x)
                total = total + low_rank(x, a.astype(dtype), b.astype(dtype), n_in, scale)
            return total

        return Applied(_apply_with(module, variables, args, kwargs, active, delta))

    def export(self, params: dict) -> dict:
        """The base with every listed adapter's ``w·s·A·B`` folded in; others stay attached."""
        for name, scales in self.scales(params).items():
            rest, adapter = detach(params, name)
            params = merge_lora(attach(rest, adapter), scales)
        return params


# ---------------------------------------------------------------------------------------------
# A mixed batch: one adapter per row
# ---------------------------------------------------------------------------------------------


def stack_adapters(params, adapters: Sequence, *, weights: Sequence[float] | None = None,
                   rank: int | None = None) -> dict:
    """The stacked tree :func:`mixed_apply` reads, from ``adapters``: ``(LoRA method, adapter)``
    pairs as :func:`load_adapter` returns them, each checked to fit the base ``params``.
    ``{module}/a [N, *inputs, R]``, ``{module}/b [N, R, *outputs]``, ``{module}/scale [N]``
    (``w_i·s_i``; 0 where adapter i leaves the module alone). ``R`` is the largest rank, or
    ``rank`` (fix it to keep one compilation as adapters of other ranks come and go).
    Stacking runs on the host in numpy: a serving loop restacks often, and eager jnp ops would
    compile a kernel for every new factor shape."""
    weights = (1.0,) * len(adapters) if weights is None else tuple(weights)
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"stack_adapters: {len(adapters)} adapters (at least one) and "
                         f"{len(weights)} weights must match")
    per_adapter = []  # {module: (a, b, w·s)} for each adapter
    for (method, adapter), weight in zip(adapters, weights):
        factors = _by_module(tree.flatten(adapter))
        scales = tree.flatten(method.scales(attach(params, adapter)))
        per_adapter.append({sites.parent(target): (*factors[sites.parent(target)], weight * s)
                            for target, s in scales.items()})
    widest = max(a.shape[-1] for entry in per_adapter for a, _, _ in entry.values())
    if rank is not None and rank < widest:
        raise ValueError(f"stack_adapters: rank={rank} is below the largest adapter rank "
                         f"{widest}")
    rank = rank or widest
    modules = [sites.parent(p) for p in tree.flatten(params)
               if p.rpartition(tree.SEP)[2] in TARGET_LEAVES]
    stacked = {}
    for module in (m for m in modules if any(m in entry for entry in per_adapter)):
        first_a, first_b, _ = next(entry[module] for entry in per_adapter if module in entry)
        inputs, outputs = first_a.shape[:-1], first_b.shape[1:]
        a_stack = np.zeros((len(adapters), *inputs, rank), first_a.dtype)
        b_stack = np.zeros((len(adapters), rank, *outputs), first_b.dtype)
        scale = np.zeros(len(adapters), np.float32)
        for index, entry in enumerate(per_adapter):
            if module not in entry:
                continue
            a, b, scale[index] = entry[module]
            if a.shape[:-1] != inputs:
                raise ValueError(f"stack_adapters: adapters split {module}'s kernel into "
                                 f"inputs {tuple(inputs)} and {tuple(a.shape[:-1])}")
            a_stack[index, ..., :a.shape[-1]] = np.asarray(a)
            b_stack[index, :b.shape[0]] = np.asarray(b)
        for leaf, value in (("a", a_stack), ("b", b_stack), ("scale", scale)):
            stacked[sites.join(module, leaf)] = jnp.asarray(value)
    return tree.unflatten(stacked)


def mixed_apply(module, params, stacked, adapter_ids, *args, **kwargs):
    """``module.apply({'params': params}, *args, **kwargs)`` where row ``b`` of the batch gets
    ``scale[i]·(x·A[i])·B[i]`` with ``i = adapter_ids[b]`` at every stacked module; an id
    outside ``[0, N)`` (use -1) runs that row on the base alone. Jit it with ``module`` static:
    new ids, factor values or scales of the same shapes reuse the compilation.

    Each row's factors are gathered (``A[ids]``: ``[batch, *inputs, R]``) and applied as a
    batched matmul, which moves ``batch·R·(inputs + outputs)`` numbers. A one-hot contraction
    over N builds the same per-row factors with N times that work, and running every adapter on
    every row multiplies the token matmuls by N. On CPU (width 384, rank 16): at 128 tokens a
    row and N=32 the gather and the one-hot take about the same time and every-adapter ~15x
    longer; at one token a row (decoding) and N=64 the gather is ~25% faster than one-hot."""
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"mixed_apply: adapter_ids must be integers [batch]; got {ids.dtype} "
                         f"{ids.shape}")
    flat = tree.flatten(stacked)
    modules = {}
    for path in flat:
        site = sites.parent(path)
        if not all(sites.join(site, leaf) in flat for leaf in ("a", "b", "scale")):
            raise ValueError(f"mixed_apply: stacked leaf {path!r} needs a, b and scale beside "
                             f"it (see stack_adapters)")
        modules[site] = tuple(flat[sites.join(site, leaf)] for leaf in ("a", "b", "scale"))
    batch = ids.shape[0]

    def delta(layer, path, inputs, n_in):
        a, b, scale = modules[path]
        if inputs.shape[:1] != (batch,):
            raise ValueError(f"mixed_apply: {path} gets inputs {tuple(inputs.shape)} whose "
                             f"leading axis is not the batch of {batch} adapter_ids")
        valid = (ids >= 0) & (ids < scale.shape[0])
        safe = jnp.where(valid, ids, 0)
        dtype, rank = sites.compute_dtype_of(layer, inputs, a), a.shape[-1]
        if n_in == 0:
            rows = a[safe.reshape((batch,) + (1,) * (inputs.ndim - 1)), inputs]
            hidden, lead = rows.astype(dtype).reshape(batch, -1, rank), inputs.shape
        else:
            _check_axes(path, a, n_in, leading=1)
            lead = inputs.shape[:inputs.ndim - n_in]
            x = inputs.astype(dtype).reshape(batch, -1, int(np.prod(a.shape[1:-1])))
            hidden = jnp.einsum("bti,bir->btr", x, a[safe].astype(dtype).reshape(batch, -1, rank))
        row_scale = jnp.where(valid, scale[safe], 0.0).astype(dtype)
        out = jnp.einsum("btr,bro->bto", hidden * row_scale[:, None, None],
                         b[safe].astype(dtype).reshape(batch, rank, -1))
        return out.reshape(*lead, *b.shape[2:])

    return _apply_with(module, {"params": params}, args, kwargs, modules, delta)
