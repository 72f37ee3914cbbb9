"""Masks learned by gradient descent over real-valued scores, one score per weight entry.

Grafting (Panigrahi, Saunshi, Zhao & Arora, 2023, "Task-Specific Skill Localization in
Fine-tuned Language Models"): given the pretrained θpre and a fine-tuned θft, learn a mask γ so
that θpre + γ ⊙ (θft − θpre) keeps the fine-tuned skill with a tiny share of the entries. γ is
relaxed to σ(S) and starts from the top-s entries by movement |θft − θpre|; after training it is
rounded (γ > 1/2). :class:`Graft` stores, for every graftable leaf ``p``, the scores at
``graft_score/p`` (the only leaves that train) and θft at ``graft_finetuned/p`` (frozen: one
copy, the size θft − θpre would take); the step forms (1 − γ)·θpre + γ·θft, which is θpre or θft
bit for bit where γ is 0 or 1 (θpre + γ·(θft − θpre) need not be). The task head is taken whole
from θft and frozen.

Regularized mask tuning (Zheng, Wu, Feng, Zhu, Liu, Zhao, Zha, Chen & Shen, 2023, "Regularized
Mask Tuning: Uncovering Hidden Knowledge in Pre-trained Vision-Language Models"): learn a binary
mask M over chosen pretrained weights, θ = θpre ⊙ M with M = 1[S > threshold] in the forward pass
and the identity as its gradient (straight-through), under a norm penalty on S; the task head
trains as usual. Its regulariser is gradient dropout: each entry of the score gradient ga of the
task loss is kept with probability P = (sign(ga)·(ga + gb) / (|ga| + |gb|) + 1) / 2, where gb is
the gradient of a distillation loss towards the unmasked model. An entry on which both agree is
always kept; one where they disagree is kept with probability |ga| / (|ga| + |gb|). Dropped
entries are scaled by 1 − λ (λ = 1: zeroed). Scores live at ``mask_score/p``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from research import methods, sites, tree
from research.methods import Applied, Method, register, training
from research.sparse import masks as masks_lib

GRAFT_SCORE, GRAFT_FINETUNED, MASK_SCORE = "graft_score", "graft_finetuned", "mask_score"
METHOD_TREES = (GRAFT_SCORE, GRAFT_FINETUNED, MASK_SCORE)
# A fixed salt so gradient dropout's draws differ from the model's own dropout in the step.
_GDR_SALT = 0x6764


def _own(path: str) -> bool:
    return path.split(tree.SEP, 1)[0] in METHOD_TREES


def _beside(flat: dict, prefix: str) -> list[str]:
    """Model paths that have a leaf under ``prefix`` in ``flat``."""
    start = prefix + tree.SEP
    return [path[len(start):] for path in flat if path.startswith(start)]


def model_params(params) -> dict:
    """``params`` without the leaves these methods add."""
    return tree.unflatten({p: v for p, v in tree.flatten(params).items() if not _own(p)})


def _chosen(rules, flat: dict, what: str) -> list[str]:
    """Paths of ``flat`` whose first matching ``(regex, bool)`` rule says True."""
    values = tree.resolve_rules(rules, flat, default=False, what=what)
    for path, value in values.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{what} for {path!r}: value {value!r} is not True or False")
    return [path for path, value in values.items() if value]



def _mirror_axes(logical: dict, shapes: dict, prefixes) -> dict:
    """A method leaf ``prefix/p`` is laid out like the model leaf ``p``."""
    flat_logical = dict(tree.flatten(logical))
    for prefix in prefixes:
        for path in _beside(tree.flatten(shapes), prefix):
            flat_logical[sites.join(prefix, path)] = flat_logical.get(path)
    return tree.unflatten(flat_logical)


# ---------------------------------------------------------------------------------------------
# Grafting
# ---------------------------------------------------------------------------------------------


DEFAULT_GRAFT = ((r"(embeddings|encoder|pooler)/.*", True),)


@register("graft")
@dataclasses.dataclass(frozen=True)
class Graft(Method):
    """Grafting options (``config.method = dict(name='graft', finetuned=WORKDIR, ...)``).

    finetuned: workdir of the finished fine-tuning run whose last checkpoint is θft (its head
        and every graftable leaf must match the model's shapes); θpre is the run's own model
        (``config.model.pretrained``).
    graft: ``(regex, bool)`` rules over model paths, first match wins: the leaves a mask is
        learned over (default: embeddings, encoder and pooler, every entry).
    head: path regexes of leaves copied whole from θft and frozen (default the classifier); they
        may not overlap ``graft``.
    density: share of the graftable entries in the starting mask, the top ones by |θft − θpre|
        (the paper's ``sparsity_level``).
    sigmoid_bias: scores start at +bias inside that mask and −bias outside, so γ = σ(S) starts
        within σ(−bias) of the mask (the paper's base mask plus a correction σ(S − bias)
        started near 0, with the sign of S flipped on the base mask: the same parametrisation).
    """

    finetuned: str = ""
    graft: tuple = DEFAULT_GRAFT
    head: tuple = (r"classifier/.*",)
    density: float = 1e-4
    sigmoid_bias: float = 10.0
    # θft's leaves, host arrays by path: read by ``prepare`` (or given to ``with_finetuned``).
    finetuned_leaves: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "graft", tree.rule_tuples(self.graft))
        set_(self, "head", tuple(self.head or ()))
        if not self.finetuned or not isinstance(self.finetuned, str):
            raise ValueError("Graft needs finetuned: the workdir of a finished fine-tuning run")
        masks_lib.check_density(self.density, "Graft density")
        if not self.sigmoid_bias > 0:
            raise ValueError(f"Graft sigmoid_bias={self.sigmoid_bias!r} is not positive")
        set_(self, "trainable", (rf"{GRAFT_SCORE}/.*",) if self.trainable is None
             else tuple(self.trainable))

    def plan(self, params) -> tuple[list[str], list[str]]:
        """``(graftable paths, head paths)`` of the model leaves of ``params``."""
        flat = {p: v for p, v in tree.flatten(params).items() if not _own(p)}
        grafted = _chosen(self.graft, flat, "Graft graft rule")
        if not grafted:
            raise ValueError(f"Graft graft rules {list(self.graft)} select no leaf")
        head = _chosen([(pattern, True) for pattern in self.head], flat, "Graft head pattern")
        both = sorted(set(grafted) & set(head))
        if both:
            raise ValueError(f"Graft: {both[0]!r} is both grafted and head (taken whole from "
                             "θft); narrow one of the rules")
        return grafted, head

    def prepare(self, context: methods.Context) -> Graft:
        """θft read from the fine-tuning run's last checkpoint (exported by its method)."""
        if self.finetuned_leaves is not None:
            return self
        if not os.path.isdir(os.path.join(self.finetuned, "checkpoints")):
            raise FileNotFoundError(f"config.method.finetuned={self.finetuned!r} has no "
                                    "checkpoints folder (the workdir of a finished fine-tuning "
                                    "run)")
        return self.with_finetuned(context.read_checkpoint(self.finetuned,
                                                           key="config.method.finetuned"))

    def with_finetuned(self, params) -> Graft:
        """This method with θft given as a params tree (a notebook's fine-tuned model)."""
        return dataclasses.replace(self, finetuned_leaves={
            path: np.asarray(value) for path, value in tree.flatten(params).items()})

    def _finetuned(self, flat: dict, paths) -> dict:
        saved = self.finetuned_leaves
        if saved is None:
            raise ValueError(f"Graft has not read θft from config.method.finetuned="
                             f"{self.finetuned!r}; prepare it (loop.make_setup does) or call "
                             f"with_finetuned(params)")
        for path in paths:
            if path not in saved:
                raise ValueError(f"config.method.finetuned={self.finetuned!r} has no param "
                                 f"{path!r}; closest: {tree.closest_paths(path, saved)}")
            if saved[path].shape != tuple(flat[path].shape):
                raise ValueError(f"config.method.finetuned={self.finetuned!r}: {path!r} has "
                                 f"shape {saved[path].shape}, the model {tuple(flat[path].shape)}")
        return {path: saved[path] for path in paths}

    def init(self, rng, params: dict, stats=None) -> dict:
        """θft's head in place of the model's; scores and θft beside every graftable leaf."""
        del rng, stats
        flat = dict(tree.flatten(params))
        grafted, head = self.plan(params)
        finetuned = self._finetuned(flat, grafted + head)
        for path in head:
            flat[path] = jnp.asarray(finetuned[path], flat[path].dtype)
        movement = jnp.concatenate([
            jnp.abs(finetuned[p].astype(np.float32) - flat[p].astype(jnp.float32)).ravel()
            for p in grafted])
        k = max(1, int(self.density * movement.size))
        start = jnp.zeros(movement.shape, bool).at[jax.lax.top_k(movement, k)[1]].set(True)
        offset = 0
        for path in grafted:
            shape = flat[path].shape
            size = int(np.prod(shape))
            chosen = start[offset:offset + size].reshape(shape)
            offset += size
            flat[sites.join(GRAFT_SCORE, path)] = jnp.where(chosen, self.sigmoid_bias,
                                                       -self.sigmoid_bias).astype(jnp.float32)
            flat[sites.join(GRAFT_FINETUNED, path)] = jnp.asarray(finetuned[path], flat[path].dtype)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        return _mirror_axes(logical, shapes, (GRAFT_SCORE, GRAFT_FINETUNED))

    def relaxed(self, params) -> dict:
        """The model's params at γ = σ(S): ``(1 − γ)·θpre + γ·θft`` (exactly θpre or θft where γ
        is exactly 0 or 1)."""
        flat = tree.flatten(params)
        out = {p: v for p, v in flat.items() if not _own(p)}
        for path in _beside(flat, GRAFT_SCORE):
            gamma = jax.nn.sigmoid(flat[sites.join(GRAFT_SCORE, path)])
            pre = out[path]
            mixed = (1 - gamma) * pre + gamma * flat[sites.join(GRAFT_FINETUNED, path)]
            out[path] = mixed.astype(pre.dtype)
        return tree.unflatten(out)

    def binarise(self, params) -> tuple[dict, dict]:
        """``(grafted params, mask)`` in host memory: θft where σ(S) > 1/2 (the paper rounds
        γ), θpre elsewhere; the mask has the model's structure (False on leaves not grafted)."""
        flat = {p: np.asarray(v) for p, v in tree.flatten(params).items()}
        out = {p: v for p, v in flat.items() if not _own(p)}
        mask = {p: False for p in out}
        for path in _beside(flat, GRAFT_SCORE):
            mask[path] = flat[sites.join(GRAFT_SCORE, path)] > 0
            out[path] = np.where(mask[path], flat[sites.join(GRAFT_FINETUNED, path)], out[path])
        return tree.unflatten(out), tree.unflatten(mask)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """The relaxed model; logs ``graft_density``, the share of graftable entries with
        γ > 1/2."""
        outputs = module.apply({**variables, "params": self.relaxed(variables["params"])},
                               *args, **kwargs)
        scores = [v for p, v in tree.flatten(variables["params"]).items()
                  if p.startswith(GRAFT_SCORE + tree.SEP)]
        density = sum(jnp.sum(s > 0) for s in scores) / sum(s.size for s in scores)
        return Applied(outputs, metrics={"graft_density": density})

    def export(self, params: dict) -> dict:
        """The grafted model: θft where σ(S) > 1/2, θpre elsewhere."""
        return self.binarise(params)[0]


# ---------------------------------------------------------------------------------------------
# Regularized mask tuning
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def straight_through(scores, threshold: float):
    """``1[scores > threshold]`` in the scores' dtype, whose derivative is taken as the
    identity (the straight-through estimator)."""
    return (scores > threshold).astype(scores.dtype)


@straight_through.defjvp
def _straight_through_jvp(threshold, primals, tangents):
    return straight_through(primals[0], threshold), tangents[0]


def gradient_dropout(key, task_grad, other_grad, strength: float = 1.0, eps: float = 1e-8):
    """The paper's gradient dropout of ``task_grad`` given ``other_grad`` (a tree of the same
    structure): each entry is kept with P = (sign(ga)·(ga + gb) / (|ga| + |gb| + eps) + 1) / 2
    and otherwise multiplied by ``1 - strength``."""
    leaves, structure = jax.tree.flatten(task_grad)
    others = structure.flatten_up_to(other_grad)
    dropped = []
    for index, (ga, gb) in enumerate(zip(leaves, others)):
        keep_p = (jnp.sign(ga) * (ga + gb) / (jnp.abs(ga) + jnp.abs(gb) + eps) + 1) / 2
        keep = keep_p > jax.random.uniform(jax.random.fold_in(key, index), ga.shape)
        dropped.append(((1 - strength) + strength * keep.astype(ga.dtype)) * ga)
    return structure.unflatten(dropped)


def distillation_loss(logits, teacher_logits, temperature: float = 1.0):
    """The paper's KL term towards the unmasked model: cross-entropy of the student's tempered
    log-probabilities under the teacher's, times T², averaged over all but the class axis."""
    teacher = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature)
    log_student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    return -jnp.mean(jnp.sum(teacher * log_student, -1)) * temperature ** 2


DEFAULT_MASKED = ((r"encoder/.*/attn/(query|key|value|out)/kernel", True),)


@register("mask_tuning")
@dataclasses.dataclass(frozen=True)
class MaskTuning(Method):
    """Regularized mask tuning options (``config.method = dict(name='mask_tuning', ...)``);
    defaults as the paper's ViT-B/16 config (R-AMT: the attention kernels).

    masked: ``(regex, bool)`` rules over model paths, first match wins: the weights masked.
    also_train: path regexes that train normally (the task head); ``trainable``, when given,
        replaces the default (the scores plus ``also_train``).
    init_score / threshold: every score starts at ``init_score`` (above ``threshold``: the
        model starts as the pretrained one); an entry is kept while its score exceeds it.
    norm_weight: weight of the penalty Σ_leaves ‖S‖₂ on the scores (logged ``mask_norm``),
        which pulls scores below the threshold.
    gdr_lambda: gradient dropout strength λ in [0, 1]; 0 turns it off (then the step needs no
        teacher pass and one backward pass, not two).
    temperature: of the distillation loss whose gradient decides what is dropped.
    """

    masked: tuple = DEFAULT_MASKED
    also_train: tuple = (r"classifier/.*",)
    init_score: float = 1e-2
    threshold: float = 5e-3
    norm_weight: float = 1e-4
    gdr_lambda: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "masked", tree.rule_tuples(self.masked))
        set_(self, "also_train", tuple(self.also_train or ()))
        if not self.init_score > self.threshold:
            raise ValueError(f"MaskTuning init_score={self.init_score!r} must exceed "
                             f"threshold={self.threshold!r} (every mask starts at 1)")
        if not 0.0 <= self.gdr_lambda <= 1.0:
            raise ValueError(f"MaskTuning gdr_lambda={self.gdr_lambda!r} is not in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"MaskTuning temperature={self.temperature!r} is not positive")
        if not self.norm_weight >= 0:
            raise ValueError(f"MaskTuning norm_weight={self.norm_weight!r} is negative")
        set_(self, "trainable", (rf"{MASK_SCORE}/.*", *self.also_train) if self.trainable is None
             else tuple(self.trainable))

    def plan(self, params) -> list[str]:
        """The masked model paths of ``params``."""
        flat = {p: v for p, v in tree.flatten(params).items() if not _own(p)}
        chosen = _chosen(self.masked, flat, "MaskTuning masked rule")
        training = tree.resolve_rules([(p, True) for p in self.also_train], flat,
                                      default=False, what="MaskTuning also_train pattern")
        both = [path for path in chosen if training[path]]
        if both:
            raise ValueError(f"MaskTuning: {both[0]!r} is both masked and in also_train")
        return chosen

    def init(self, rng, params: dict, stats=None) -> dict:
        del rng, stats
        flat = dict(tree.flatten(params))
        for path in self.plan(params):
            flat[sites.join(MASK_SCORE, path)] = jnp.full(flat[path].shape, self.init_score,
                                                     jnp.float32)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        return _mirror_axes(logical, shapes, (MASK_SCORE,))

    def masked_params(self, params) -> dict:
        """The model's params with every masked weight multiplied by its binary mask."""
        flat = tree.flatten(params)
        out = {p: v for p, v in flat.items() if not _own(p)}
        for path in _beside(flat, MASK_SCORE):
            weight = out[path]
            mask = straight_through(flat[sites.join(MASK_SCORE, path)], self.threshold)
            out[path] = weight * mask.astype(weight.dtype)
        return tree.unflatten(out)

    def masks(self, params) -> dict:
        """The binary masks as a mask tree over the model (True: the weight is kept)."""
        flat = tree.flatten(params)
        out = {p: False for p in flat if not _own(p)}
        for path in _beside(flat, MASK_SCORE):
            out[path] = np.asarray(flat[sites.join(MASK_SCORE, path)] > self.threshold)
        return tree.unflatten(out)

    def sparsity(self, params) -> jax.Array:
        """Share of the masked entries whose mask is 0."""
        scores = [v for p, v in tree.flatten(params).items()
                  if p.startswith(MASK_SCORE + tree.SEP)]
        return sum(jnp.sum(s <= self.threshold) for s in scores) / sum(s.size for s in scores)

    def _norm(self, params) -> jax.Array:
        scores = [v for p, v in tree.flatten(params).items()
                  if p.startswith(MASK_SCORE + tree.SEP)]
        return self.norm_weight * sum(jnp.sqrt(jnp.sum(jnp.square(s))) for s in scores)

    def _masked_apply(self, module, variables, *args, **kwargs):
        return module.apply({**variables, "params": self.masked_params(variables["params"])},
                            *args, **kwargs)

    def export(self, params: dict) -> dict:
        """The masked model: every masked weight times its binary mask."""
        return self.masked_params(params)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """The masked forward; in training with ``mask_norm`` as a loss term (and
        ``mask_sparsity`` logged).
        With ``gdr_lambda > 0`` the scores' gradient of both goes through gradient dropout
        against the distillation loss towards the unmasked model (same inputs, same dropout
        draws, the current head); other leaves get their usual gradient."""
        if not training(kwargs):
            return Applied(self._masked_apply(module, variables, *args, **kwargs))
        params = variables["params"]
        logged = {"mask_sparsity": self.sparsity(params)}

        def student(p):
            return (self._masked_apply(module, {**variables, "params": p}, *args, **kwargs),
                    self._norm(p))

        if not self.gdr_lambda:
            logits, norm = student(params)
            return Applied(logits, {"mask_norm": norm}, logged)
        key = (kwargs.get("rngs") or {}).get("dropout")
        if key is None:
            raise ValueError("MaskTuning gradient dropout needs a 'dropout' rng in the call")
        key = jax.random.fold_in(key, _GDR_SALT)
        teacher = jax.lax.stop_gradient(module.apply(
            {**variables, "params": model_params(params)}, *args, **kwargs))

        @jax.custom_vjp
        def run(p):
            return student(p)

        def run_fwd(p):
            out, vjp = jax.vjp(student, p)
            return out, (vjp, out[0])

        def run_bwd(residuals, cotangent):
            vjp, logits = residuals
            (grads,) = vjp(cotangent)
            toward_teacher = jax.grad(distillation_loss)(logits, teacher, self.temperature)
            (other,) = vjp((toward_teacher.astype(logits.dtype), jnp.zeros_like(cotangent[1])))
            flat, flat_other = tree.flatten(grads), tree.flatten(other)
            scores = [p for p in flat if p.startswith(MASK_SCORE + tree.SEP)]
            dropped = gradient_dropout(key, {p: flat[p] for p in scores},
                                       {p: flat_other[p] for p in scores}, self.gdr_lambda)
            return (tree.unflatten({**flat, **dropped}),)

        run.defvjp(run_fwd, run_bwd)
        logits, norm = run(params)
        return Applied(logits, {"mask_norm": norm}, logged)
