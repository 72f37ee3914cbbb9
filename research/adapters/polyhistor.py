"""Polyhistor (Liu, Ma, Tian, He & Kira, 2022, "Polyhistor: Parameter-Efficient Multi-Task
Adaptation for Dense Vision Tasks"): bottleneck adapters for several tasks whose weights one
hyper-network, shared by every task and layer, generates; the tasks share what they learn
through it, and one more task costs one embedding and one head.

For task ``t`` and adapter site ``s`` (a layer whose output a Houlsby adapter maps: by default
the attention output and the MLP of every block, as in :mod:`research.adapters.bottleneck`):

- Decomposed hyper-network. The task's embedding τ_t and the site's embedding λ_s pass one
  shared hidden layer, ``c = relu([τ_t; λ_s] A + a)``; shared linear heads read ``c`` into
  *template kernels* of a fixed size ``template = (d_t, m_t)``, each matrix generated as two
  low-rank factors rather than whole: ``T_down = U_down V_down`` with ``U_down`` (d_t × r) and
  ``V_down`` (r × m_t), ``T_up = U_up V_up`` (m_t × r, r × d_t), plus bias templates ``t_down``
  (m_t) and ``t_up`` (d_t). The heads' size depends on the template and the rank only: it grows
  with neither tasks nor sites.
- Layer-wise scaling kernels. Each site holds small kernels, shared across tasks, that scale the
  templates up to its own sizes by a Kronecker product: ``W_down = K_down ⊗ T_down`` with
  ``K_down`` of (d/d_t × m/m_t), ``W_up = K_up ⊗ T_up``, ``b_down = k_down ⊗ t_down``,
  ``b_up = k_up ⊗ t_up``.

The adapter is then Houlsby's, ``h ↦ h + act(h W_down + b_down) W_up + b_up``. The paper names
the parts Polyhistor (decomposed hyper-networks) and Polyhistor-Lite (with the scaling kernels,
which let one template serve the stages of a hierarchical ViT); this is the combination. With
``template`` equal to the adapter's own sizes every kernel is one scale, and what remains is the
decomposed hyper-network alone.

Init: embeddings N(0, 1); the hidden layer and heads LeCun normal (so templates start near unit
scale), but the down-bias head zero; ``K_down`` N(0, init_scale), so ``W_down`` starts like
Houlsby's; ``k_down`` ones; ``K_up`` and ``k_up`` zero. Every task's adapters start with
``W_up = 0`` and zero biases, so the model's output is exactly unchanged at init (the paper gives
no init; this is Houlsby's near-identity start made exact, as bottleneck.py does). The first
step moves the up-side kernels, the next ones the hyper-network.

Each task has its own head (:mod:`research.adapters.shared`); ``task`` picks the embedding and
head a call uses. :meth:`Polyhistor.export` is that task's model: the generated adapters as
Houlsby's leaves (``SITE/adapter/{down,up}/{kernel,bias}``) beside the plain params and its head
in the model's, which :meth:`Polyhistor.as_adapters` runs; :meth:`Polyhistor.apply` is exactly
that. Leaves: ``polyhistor/{task_embedding, hidden_weights, hidden_bias, down_u, down_v, up_u,
up_v, down_bias, up_bias}`` and, per site, ``SITE/polyhistor/{layer_embedding, down_scaling,
up_scaling, down_bias_scaling, up_bias_scaling}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from research import sites, tree
from research.adapters import shared
from research.adapters.bottleneck import ATTENTION_SITES, MLP_SITES
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.methods import Applied, Method, register

HYPER = "polyhistor"
OWN_PATTERN = rf"(.*/)?{HYPER}/[^/]+"
LAYER_EMBEDDING = "layer_embedding"
SCALING_KERNELS = ("down_scaling", "up_scaling", "down_bias_scaling", "up_bias_scaling")


def _positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.method.{key}={value!r} is not an integer >= 1")


def _own(path: str) -> bool:
    return f"/{HYPER}/" in f"/{path}"


def head_shapes(template, rank: int, hidden: int) -> dict[str, tuple[int, int]]:
    """The hyper-network's linear heads: ``c [hidden]`` to each template factor, flattened."""
    d_t, m_t = template
    return {"down_u": (hidden, d_t * rank), "down_v": (hidden, rank * m_t),
            "up_u": (hidden, m_t * rank), "up_v": (hidden, rank * d_t),
            "down_bias": (hidden, m_t), "up_bias": (hidden, d_t)}


def template_kernels(hyper: dict, task_embedding, layer_embedding, template, rank: int) -> dict:
    """What the hyper-network makes for one (task, site): the templates ``down`` (d_t × m_t) and
    ``up`` (m_t × d_t), each a product of two generated factors, and ``down_bias`` (m_t) and
    ``up_bias`` (d_t)."""
    d_t, m_t = template
    code = jax.nn.relu(jnp.concatenate([task_embedding, layer_embedding])
                       @ hyper["hidden_weights"] + hyper["hidden_bias"])

    def factor(name, *shape):
        return (code @ hyper[name]).reshape(shape)
    return {"down": factor("down_u", d_t, rank) @ factor("down_v", rank, m_t),
            "up": factor("up_u", m_t, rank) @ factor("up_v", rank, d_t),
            "down_bias": code @ hyper["down_bias"], "up_bias": code @ hyper["up_bias"]}


def scaled_adapter(templates: dict, kernels: dict) -> dict:
    """A site's Houlsby adapter leaves: each template scaled up by the site's kernel
    (Kronecker product)."""
    return {"down": {"kernel": jnp.kron(kernels["down_scaling"], templates["down"]),
                     "bias": jnp.kron(kernels["down_bias_scaling"], templates["down_bias"])},
            "up": {"kernel": jnp.kron(kernels["up_scaling"], templates["up"]),
                   "bias": jnp.kron(kernels["up_bias_scaling"], templates["up_bias"])}}


@register("polyhistor")
@dataclasses.dataclass(frozen=True)
class Polyhistor(shared.PerTask, Method):
    """Polyhistor options (``config.method = dict(name='polyhistor', tasks=(...), ...)``).

    tasks: the task names (``launch/multitask.py`` reads them as data names); task: the one a
        call runs (default the first); head: the module each task gets its own copy of
        (``None``: one head for all).
    targets, reduction_factor, bottleneck, nonlinearity, input_axes: where the adapters sit and
        their sizes, as Houlsby's (:class:`~research.adapters.bottleneck.Bottleneck`).
    template: ``(d_t, m_t)``, the generated template's size; it must divide every site's
        ``(d, m)``, and the scaling kernels are ``(d/d_t, m/m_t)``.
    rank: ``r`` of the template's generated factors. embedding_dim: size of the task and layer
        embeddings. hidden_dim: width of the hyper-network's hidden layer.
    init_scale: std of ``K_down`` at init. also_train: extra path regexes that train.
    Trainable: the hyper-network, the embeddings, the scaling kernels, the per-task heads and
    ``also_train``.
    """

    tasks: tuple = ()
    task: str | None = None
    head: str | None = "classifier"
    targets: tuple = (ATTENTION_SITES, MLP_SITES)
    reduction_factor: int = 16
    bottleneck: int | None = None
    nonlinearity: str = "gelu"
    input_axes: tuple = DEFAULT_INPUT_AXES
    template: tuple = (32, 6)
    rank: int = 4
    embedding_dim: int = 32
    hidden_dim: int = 64
    init_scale: float = 1e-2
    also_train: tuple = ()

    # Its sites are keyed by layer path (one embedding and kernel set per layer).
    scannable: ClassVar[bool] = False

    def __post_init__(self):
        set_ = object.__setattr__
        tasks, task = shared.check_tasks(self.tasks, self.task)
        set_(self, "tasks", tasks)
        set_(self, "task", task)
        template = tuple(self.template or ())
        if len(template) != 2:
            raise ValueError(f"config.method.template={self.template!r} is not a (d_t, m_t) pair")
        for value in template:
            _positive("template", value)
        set_(self, "template", template)
        for key in ("rank", "embedding_dim", "hidden_dim"):
            _positive(key, getattr(self, key))
        set_(self, "also_train", tuple(self.also_train or ()))
        self.as_adapters()  # checks the adapter options, with their one-line errors
        if self.trainable is None:
            set_(self, "trainable", (OWN_PATTERN, *shared.head_patterns(self.head),
                                     *self.also_train))

    def plan(self, params) -> dict[str, tuple[int, int]]:
        """``{site path: (d, m)}``; a template that does not divide a site is a one-line error."""
        d_t, m_t = self.template
        plan = {}
        for path, site in self.as_adapters().plan(params).items():
            if site.width % d_t or site.bottleneck % m_t:
                raise ValueError(f"config.method.template={self.template} does not divide the "
                                 f"adapter at {path} ({site.width} x {site.bottleneck}); pick "
                                 f"sizes that divide every site's (width, bottleneck)")
            plan[path] = (site.width, site.bottleneck)
        return plan

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        del stats
        flat = dict(tree.flatten(params))
        plan = self.plan(params)
        d_t, m_t = self.template
        keys = iter(jax.random.split(rng, 8 + 2 * len(plan)))

        def lecun(shape):
            return jax.random.normal(next(keys), shape) / math.sqrt(shape[0])
        width = 2 * self.embedding_dim
        flat[f"{HYPER}/task_embedding"] = jax.random.normal(
            next(keys), (len(self.tasks), self.embedding_dim))
        flat[f"{HYPER}/hidden_weights"] = lecun((width, self.hidden_dim))
        flat[f"{HYPER}/hidden_bias"] = jnp.zeros((self.hidden_dim,))
        for name, shape in head_shapes(self.template, self.rank, self.hidden_dim).items():
            # The down-bias head starts at zero beside kernels at one: b_down = 0, yet its
            # path is live (a zero kernel and a zero head would never move).
            flat[f"{HYPER}/{name}"] = jnp.zeros(shape) if name == "down_bias" else lecun(shape)
        for path, (d, m) in plan.items():
            own = sites.join(path, HYPER)
            p, q = d // d_t, m // m_t
            flat[f"{own}/{LAYER_EMBEDDING}"] = jax.random.normal(next(keys),
                                                                 (self.embedding_dim,))
            flat[f"{own}/down_scaling"] = self.init_scale * jax.random.normal(next(keys), (p, q))
            flat[f"{own}/up_scaling"] = jnp.zeros((q, p))
            flat[f"{own}/down_bias_scaling"] = jnp.ones((q,))
            flat[f"{own}/up_bias_scaling"] = jnp.zeros((p,))
        return tree.unflatten(shared.add_task_heads(flat, self.head, len(self.tasks)))

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """The method's own leaves are small: unsharded."""
        flat = dict(tree.flatten(logical))
        flat_shapes = tree.flatten(shapes)
        for path, shape in flat_shapes.items():
            if _own(path):
                flat[path] = (None,) * len(shape.shape)
        return tree.unflatten(shared.task_head_axes(flat, flat_shapes, self.head))

    def adapters(self, params) -> dict[str, dict]:
        """``{site path: Houlsby adapter leaves}`` that the hyper-network makes for ``task``."""
        flat = tree.flatten(params)
        names = ("task_embedding", "hidden_weights", "hidden_bias",
                 *head_shapes(self.template, self.rank, self.hidden_dim))
        missing = [name for name in names if f"{HYPER}/{name}" not in flat]
        if missing:
            raise ValueError(f"polyhistor leaf {HYPER}/{missing[0]} is not in the params "
                             f"(run init first)")
        hyper = {name: flat[f"{HYPER}/{name}"] for name in names}
        task_embedding = hyper.pop("task_embedding")
        if task_embedding.shape[0] != len(self.tasks):
            raise ValueError(f"polyhistor: the params hold {task_embedding.shape[0]} task "
                             f"embeddings, not one per config.method.tasks={list(self.tasks)}")
        suffix = f"/{HYPER}/{LAYER_EMBEDDING}"
        out = {}
        for path in (p[:-len(suffix)] for p in flat if p.endswith(suffix)):
            own = sites.join(path, HYPER)
            templates = template_kernels(hyper, task_embedding[self.index],
                                         flat[f"{own}/{LAYER_EMBEDDING}"], self.template,
                                         self.rank)
            out[path] = scaled_adapter(templates,
                                       {name: flat[f"{own}/{name}"] for name in SCALING_KERNELS})
        return out

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``task``'s generated adapters and head, run as Houlsby's."""
        return self.as_adapters().apply(
            module, {**variables, "params": self.export(variables["params"])}, *args, **kwargs)

    def export(self, params: dict) -> dict:
        """``task``'s model: its generated adapters at ``SITE/adapter/...`` beside the plain
        params, its head in the model's; the hyper-network, embeddings and kernels dropped."""
        flat = {p: v for p, v in tree.flatten(params).items() if not _own(p)}
        for path, adapter in self.adapters(params).items():
            for leaf, value in tree.flatten(adapter).items():
                flat[sites.join(path, "adapter", leaf)] = value
        return tree.unflatten(shared.with_task_head(flat, self.head, self.index))
