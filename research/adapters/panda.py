"""PANDA (Zhong, Ding, Liu, Du & Tao, 2022, "PANDA: Prompt Transfer Meets Knowledge Distillation
for Efficient Model Adaptation"): prompt transfer (the target task's prompt starts from a prompt
trained on a source task) plus knowledge distillation, so that tuning the prompt on the target
task does not forget what the source prompt knew. The teacher is the frozen model with the
source run's prompt (and its head); the student is the same model with the target prompt, which
starts as the teacher's and trains on the target task's loss plus

    weight · T² · mean_rows KL(softmax(z_teacher / T) ‖ softmax(z_student / T))

(Hinton et al.'s distillation at temperature ``T``), or, with ``distillation='mse'``,
``weight · mean((z_student − z_teacher)²)``, the logit MSE the authors' released code uses.

The teacher is read from the source run's last checkpoint in ``prepare`` (its export, so a
P-tuning run gives its plain prompt): the prompt, and the leaves ``also_train`` picks (its head),
which also start the student's, so at init the student *is* the teacher and the term is 0.
They are stored frozen at ``panda_teacher/PATH`` and pass through ``stop_gradient``: the teacher
gets no gradient. It runs without dropout, in training steps only (the loop reads the term
there). The source run must start from the same pretrained model (its frozen weights are not
read).

Not in this method: the paper's transferability metric, which sets the distillation's weight
per source–target pair (here ``weight`` is given), and the choice of teacher. The released code
distils from the source prompt already transferred to the target task (a vanilla prompt-transfer
run); any prompt-tuning run can be ``source``, so that setup is a source run trained with
``config.model.init_from`` set to the source task's run.

:meth:`Panda.export` drops the teacher: the params are a prompt-tuning run's.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from research import methods, sites, tree
from research.adapters.prompts import PromptTuning
from research.methods import Applied, register, training

TEACHER = "panda_teacher"
DISTILLATIONS = ("kl", "mse")


def distillation_loss(student_logits, teacher_logits, temperature: float, kind: str = "kl"):
    """The mean over rows (every axis but the last) of the distillation term, unweighted."""
    student = student_logits.astype(jnp.float32)
    teacher = teacher_logits.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean((student - teacher) ** 2)
    log_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_student = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    return temperature ** 2 * jnp.mean(kl)


@register("panda")
@dataclasses.dataclass(frozen=True)
class Panda(PromptTuning):
    """PANDA options (``config.method = dict(name='panda', source=WORKDIR, ...)``): prompt
    tuning's (``num_virtual_tokens`` must match the source's prompt; ``prompt_init`` is unused,
    the prompt starts from the source's), plus

    source: workdir of the finished prompt-tuning run whose prompt and ``also_train`` leaves
        make the teacher.
    temperature: ``T`` of the KL term. weight: the term's weight (the paper's λ).
    distillation: ``kl`` (at temperature ``T``) or ``mse`` (on logits, ``T`` unused).
    Trainable: the prompt and ``also_train``, as prompt tuning.
    """

    source: str = ""
    temperature: float = 2.0
    weight: float = 1.0
    distillation: str = "kl"
    # The teacher's leaves, host arrays by path: read by ``prepare`` (or given to
    # ``with_source``).
    source_leaves: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    name: str = dataclasses.field(default="panda", init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not self.source or not isinstance(self.source, str):
            raise ValueError("config.method.source must be the workdir of a finished "
                             "prompt-tuning run (the teacher)")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"config.method.temperature={self.temperature!r} is not a number "
                             f"> 0")
        if not isinstance(self.weight, (int, float)) or not self.weight >= 0:
            raise ValueError(f"config.method.weight={self.weight!r} is not a number >= 0")
        if self.distillation not in DISTILLATIONS:
            raise ValueError(f"config.method.distillation={self.distillation!r} is not one of "
                             f"{DISTILLATIONS}")

    def prepare(self, context: methods.Context) -> Panda:
        """The teacher read from the source run's last checkpoint (exported by its method)."""
        if self.source_leaves is not None:
            return self
        if not os.path.isdir(os.path.join(self.source, "checkpoints")):
            raise FileNotFoundError(f"config.method.source={self.source!r} has no checkpoints "
                                    "folder (the workdir of a finished prompt-tuning run)")
        return self.with_source(context.read_checkpoint(self.source, key="config.method.source"))

    def with_source(self, params) -> Panda:
        """This method with the teacher taken from a params tree (a notebook's source run)."""
        flat = tree.flatten(params)
        if self.prompt_path not in flat:
            raise ValueError(f"config.method.source={self.source!r} has no prompt "
                             f"{self.prompt_path!r}: the teacher is a prompt-tuning run")
        chosen = tree.resolve_rules([(pattern, True) for pattern in self.also_train], list(flat),
                                    default=False, require_match=False)
        kept = [self.prompt_path, *(p for p, take in chosen.items() if take)]
        return dataclasses.replace(self, source_leaves={p: np.asarray(flat[p]) for p in kept})

    def _teacher(self) -> dict:
        if self.source_leaves is None:
            raise ValueError(f"panda has not read its teacher from config.method.source="
                             f"{self.source!r}; prepare it (loop.make_setup does) or call "
                             f"with_source(params)")
        return self.source_leaves

    def init(self, rng, params: dict, stats=None) -> dict:
        """The student's prompt and ``also_train`` leaves from the teacher's, and the teacher's
        beside them at ``panda_teacher/...``."""
        del rng, stats
        flat = dict(tree.flatten(params))
        width = tuple(self._table(flat).shape)[1]
        for path, value in self._teacher().items():
            want = ((self.num_virtual_tokens, width) if path == self.prompt_path
                    else tuple(flat[path].shape) if path in flat else None)
            if want is None:
                raise ValueError(f"config.method.source={self.source!r}: {path!r} is not a "
                                 f"param of this model; closest: "
                                 f"{', '.join(tree.closest_paths(path, flat))}")
            if tuple(value.shape) != want:
                raise ValueError(f"config.method.source={self.source!r}: {path!r} has shape "
                                 f"{tuple(value.shape)}, this run needs {want} (prompt: "
                                 f"config.method.num_virtual_tokens)")
            flat[path] = flat[sites.join(TEACHER, path)] = jnp.asarray(value, jnp.float32)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """The teacher's leaves are laid out as the student's."""
        flat = dict(tree.flatten(super().logical_axes(logical, shapes)))
        for path in tree.flatten(shapes):
            if path.startswith(TEACHER + tree.SEP):
                flat[path] = flat.get(path[len(TEACHER) + 1:])
        return tree.unflatten(flat)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """The student's outputs; in training, the distillation term too."""
        flat = tree.flatten(variables["params"])
        teacher = {p[len(TEACHER) + 1:]: v for p, v in flat.items()
                   if p.startswith(TEACHER + tree.SEP)}
        student = {p: v for p, v in flat.items() if not p.startswith(TEACHER + tree.SEP)}
        outputs = super().apply(module, {**variables, "params": tree.unflatten(student)},
                                *args, **kwargs).outputs
        if not training(kwargs):
            return Applied(outputs)
        if not teacher:
            raise ValueError(f"panda: the teacher's leaves {TEACHER}/... are not in the params "
                             f"(run init first)")
        frozen = jax.lax.stop_gradient(tree.unflatten({**student, **teacher}))
        teacher_outputs = super().apply(module, {**variables, "params": frozen}, *args,
                                        **{**kwargs, "deterministic": True}).outputs
        term = distillation_loss(outputs, teacher_outputs, self.temperature, self.distillation)
        return Applied(outputs, losses={"distillation": self.weight * term})

    def export(self, params: dict) -> dict:
        """The student as a prompt-tuning run's params: the teacher dropped."""
        return tree.unflatten({p: v for p, v in tree.flatten(params).items()
                               if not p.startswith(TEACHER + tree.SEP)})
