"""IAPT (Zhu et al., 2024, "IAPT: Instruction-Aware Prompt Tuning for Large Language Models"):
the model stays frozen and every layer reads ``m`` soft prompt tokens made from the input
itself by a small generator of its own, so each input gets its own prompts (a summary of it).

Layer ``l``'s generator reads that layer's input hidden states ``H [L, d]`` of the real tokens
(padding left out) through a bottleneck:

    Z = H W_down + b_down                         [L, r]   down-projection
    A = softmax over L of (Q Z^T / sqrt(r))       [m, L]   attention pooling, m learned queries
    P = R_l(A Z) W_up + b_up                      [m, d]   rational activation, up-projection

``R_l(x) = (a_0 + a_1 x + ... + a_5 x^5) / (1 + |b_1||x| + ... + |b_4||x|^4)`` is a learned
rational activation, the "safe" Padé activation unit of Molina et al. (2020, "Padé Activation
Units"), with its own coefficients at every layer, since the paper finds that the layers want
different activations. It starts as a least-squares fit of GELU on [-3, 3] (:data:`GELU_FIT`).

Insertion, as deep prompts (P-tuning v2): the stack gets ``m`` slots in front of its input and
``m`` leading ones in its padding mask; before every layer the slots are overwritten by that
layer's prompts (replacing what the previous layer made of them), and the stack returns the real
rows only, so the model's head sees its own positions (a classifier pools [CLS] and its last
block still computes only that row). The embeddings are untouched: the real tokens keep their
positions and the slots have none. A causal model is refused: its tokens must not see prompts
pooled from tokens after them.

Init: ``W_up`` and ``b_up`` start at zero (LoRA's B, an adapter's up-projection), so every
prompt starts as the zero vector: the frozen layer reads it as key and value biases alone, and
the model starts as prefix tuning whose prefixes are those biases (the test checks this). The
gradient reaches ``W_up`` from the first step and, through it, the rest of the generator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp

from research import sites, tree
from research.methods import Applied, Method, register

ROOT = "iapt"  # the generators' leaves: iapt/layer_{i}/...
# GELU on [-3, 3] to within 3.1e-3 (least squares over the formula above, b_k kept >= 1e-3 so
# that no |b_k| starts at the kink of the absolute value, where it would get no gradient).
GELU_FIT = ((-0.001079, 0.498613, 0.406724, 0.113573, 0.014065, 0.001067),
            (0.001, 0.218409, 0.006039, 0.001))
# Each generator's leaves and their logical axes.
AXES = {"down/kernel": ("embed", None), "down/bias": (None,), "queries": (None, None),
        "rational/numerator": (None,), "rational/denominator": (None,),
        "up/kernel": (None, "embed"), "up/bias": ("embed",)}


def rational(x, numerator, denominator):
    """``(sum_j a_j x^j) / (1 + sum_k |b_k| |x|^k)``, ``a = numerator`` (degrees 0..),
    ``b = denominator`` (degrees 1..), elementwise."""
    top = jnp.zeros_like(x)
    for a in numerator[::-1]:  # Horner
        top = top * x + a
    bottom, magnitude = jnp.zeros_like(x), jnp.abs(x)
    for b in denominator[::-1]:
        bottom = (bottom + jnp.abs(b)) * magnitude
    return top / (1.0 + bottom)


def generate(leaves: dict, hidden, mask):
    """One layer's prompts ``[B, m, d]`` from its input ``hidden [B, L, d]`` of the real tokens
    and their padding ``mask [B, L]`` (None: no padding), in float32."""
    z = hidden.astype(jnp.float32) @ leaves["down/kernel"] + leaves["down/bias"]
    queries = leaves["queries"]
    scores = jnp.einsum("mr,blr->bml", queries, z) / math.sqrt(queries.shape[-1])
    if mask is not None:
        # A large finite value, not -inf: a row of padding alone pools uniformly, not to NaN.
        scores = jnp.where(mask[:, None, :] > 0, scores, -1e30)
    pooled = jnp.einsum("bml,blr->bmr", jax.nn.softmax(scores, axis=-1), z)
    activated = rational(pooled, leaves["rational/numerator"], leaves["rational/denominator"])
    return activated @ leaves["up/kernel"] + leaves["up/bias"]


@register("iapt")
@dataclasses.dataclass(frozen=True)
class IAPT(Method):
    """IAPT options (``config.method = dict(name='iapt', ...)``).

    num_virtual_tokens: ``m``, the prompt slots every layer fills (the paper's four).
    bottleneck: ``r``, the generator's width.
    encoder: the layer stack (``encoder``): every ``layer_{i}`` in it gets a generator.
    also_train: extra path regexes that train (the classifier).
    Trainable: per layer ``2·d·r + r + d + m·r + 10``, plus ``also_train``.
    """

    num_virtual_tokens: int = 4
    bottleneck: int = 32
    encoder: str = "encoder"
    also_train: tuple = ()
    # Its sites are keyed by layer path: one traced block for every layer cannot tell them apart.
    scannable: ClassVar[bool] = False

    def __post_init__(self):
        for key in ("num_virtual_tokens", "bottleneck"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.method.{key}={value!r} is not a positive integer")
        object.__setattr__(self, "also_train", tuple(self.also_train or ()))
        if self.trainable is None:
            object.__setattr__(self, "trainable", (*self.own_leaves(), *self.also_train))

    def own_leaves(self) -> tuple[str, ...]:
        """Regexes of the method's own leaves."""
        return (rf"{ROOT}/.*",)

    def layers(self, params) -> dict[str, int]:
        """``{layer path: width}`` of the stack's layers (``encoder/layer_3``: its attention's
        input width), in layer order; a stack without any is a one-line error."""
        pattern = re.compile(rf"{re.escape(self.encoder)}/layer_(\d+)/attn/query/kernel")
        flat = tree.flatten(params)
        found = sorted((int(match[1]), path) for path in flat if (match := pattern.fullmatch(path)))
        if not found:
            near = ", ".join(tree.closest_paths(f"{self.encoder}/layer_0/attn/query/kernel", flat))
            raise ValueError(f"iapt encoder={self.encoder!r} holds no layers (no "
                             f"{self.encoder}/layer_{{i}}/attn/query/kernel); closest: {near}")
        return {f"{self.encoder}/layer_{index}": int(flat[path].shape[0])
                for index, path in found}

    def init(self, rng, params: dict, stats=None) -> dict:
        """Per layer: ``W_down`` N(0, 1/d) and queries N(0, 1), so scores and ``Z`` start at unit
        scale, where the rational's fit holds; the rational at :data:`GELU_FIT`; ``W_up``,
        ``b_up`` and ``b_down`` zero."""
        del stats
        flat = dict(tree.flatten(params))
        m, r = self.num_virtual_tokens, self.bottleneck
        layers = self.layers(flat)
        for (layer, width), key in zip(layers.items(), jax.random.split(rng, len(layers))):
            down_key, query_key = jax.random.split(key)
            leaves = {"down/kernel": jax.random.normal(down_key, (width, r)) / math.sqrt(width),
                      "down/bias": jnp.zeros((r,)),
                      "queries": jax.random.normal(query_key, (m, r)),
                      "rational/numerator": jnp.asarray(GELU_FIT[0], jnp.float32),
                      "rational/denominator": jnp.asarray(GELU_FIT[1], jnp.float32),
                      "up/kernel": jnp.zeros((r, width)), "up/bias": jnp.zeros((width,))}
            for name, value in leaves.items():
                flat[sites.join(ROOT, sites.leaf(layer), name)] = value
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        flat = dict(tree.flatten(logical))
        for path in tree.flatten(shapes):
            if path.startswith(ROOT + tree.SEP):
                flat[path] = AXES[path.split(tree.SEP, 2)[2]]
        return tree.unflatten(flat)

    def generators(self, flat: dict) -> dict[str, dict]:
        """``{layer path: its generator's leaves}``, each present with the method's shapes."""
        out = {}
        for layer in self.layers(flat):
            base = sites.join(ROOT, sites.leaf(layer))
            leaves = {}
            for name in AXES:
                path = sites.join(base, name)
                if path not in flat:
                    raise ValueError(f"iapt generator leaf {path!r} is not in the params "
                                     f"(run init first)")
                leaves[name] = flat[path]
            expected = (self.num_virtual_tokens, self.bottleneck)
            if tuple(leaves["queries"].shape) != expected:
                raise ValueError(f"iapt: the params' {base}/queries is "
                                 f"{tuple(leaves['queries'].shape)}, not {expected} for "
                                 f"num_virtual_tokens={expected[0]}, bottleneck={expected[1]}")
            out[layer] = leaves
        return out

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        if module.config.causal:
            raise ValueError("iapt pools every layer's prompts from the whole input, which a "
                             "causal model's tokens must not see; use it with a bidirectional "
                             "encoder")
        generators = self.generators(tree.flatten(variables["params"]))
        handler = functools.partial(_with_prompts, n=self.num_virtual_tokens,
                                    stack=self.encoder, generators=generators, padding={})
        with sites.intercept(handler, sites.at({self.encoder, *generators})):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The params as they are: the generators compute from each input, so they stay
        beside the model under ``iapt/``."""
        return params


STACK_ARGS = ("x", "attention_mask", "deterministic", "last_rows")  # Stack.__call__'s


def _with_prompts(call: sites.Call, n: int, stack: str, generators: dict, padding: dict):
    if call.path == stack:
        args = {**dict(zip(STACK_ARGS, call.args)), **call.kwargs}
        x, mask = args["x"], args.get("attention_mask")
        padding["mask"] = mask  # the real tokens' padding, which every layer's pooling reads
        if mask is not None:
            mask = jnp.concatenate([jnp.ones((mask.shape[0], n), mask.dtype), mask], axis=1)
        last_rows = args.get("last_rows")
        slots = jnp.zeros((x.shape[0], n, x.shape[2]), x.dtype)
        out = call.run(**{**args, "x": jnp.concatenate([slots, x], axis=1),
                          "attention_mask": mask,
                          "last_rows": None if last_rows is None else last_rows + n})
        return out[:, n:]
    x = call.inputs
    real = x[:, n:]
    prompts = generate(generators[call.path], real, padding["mask"]).astype(x.dtype)
    return call.run(jnp.concatenate([prompts, real], axis=1), *call.args[1:], **call.kwargs)
