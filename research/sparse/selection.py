"""Structured selection: train a named part of the tree, freeze the rest.

- BitFit (Ben Zaken, Ravfogel & Goldberg, 2022, "BitFit: Simple Parameter-efficient Fine-tuning
  for Transformer-based Masked Language-models"): the bias terms only.
- LN-tuning (Qi et al., 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained
  Language Models"): the scale and bias of every norm.
- Lightweight fine-tuning (Zlotchevski et al., 2022, "Exploring and Evaluating Personalized Models
  for Code Generation"): the embeddings and the output layer only, or the last layer only.

Each preset also trains the task head where the model has one (a classifier starts from
scratch, so freezing it would leave the model at chance) and any ``also_train`` regexes. The
rules are plain regexes over path names, valid for BERT, ViT and Llama naming; ``{last}``
stands for the index of the last block, read from the tree.
"""

from __future__ import annotations

import dataclasses
import re

from research import tree
from research.methods import Method, register

HEAD = r"(classifier|mlm|lm_head)/.*"
_BLOCK = re.compile(r".*/layer_(?P<index>\d+)/")


def as_rules(name: str, also_train) -> tuple[str, ...]:
    """``also_train`` as a tuple of regexes (a bare string would be split into characters)."""
    if isinstance(also_train, str) or not all(isinstance(r, str) for r in also_train):
        raise ValueError(f"config.method.also_train for {name!r} must be a list of regexes, "
                         f"got {also_train!r}")
    return tuple(also_train)


def head_rules(paths) -> tuple[str, ...]:
    """The task head's rule, or none for a bare trunk."""
    return (HEAD,) if any(re.fullmatch(HEAD, p) for p in paths) else ()


def last_block(paths) -> int:
    """Index of the last transformer block (``layer_{i}``) among ``paths``."""
    indices = [int(m["index"]) for p in paths if (m := _BLOCK.match(p))]
    if not indices:
        raise ValueError(f"no 'layer_<i>' blocks among the params; closest: "
                         f"{tree.closest_paths('encoder/layer_0/', paths)}")
    return max(indices)


@dataclasses.dataclass(frozen=True)
class Selection(Method):
    """Trains the leaves its ``rules`` (plus the head and ``also_train``) name; every rule must
    match some leaf."""
    name: str = ""
    rules: tuple[str, ...] = ()
    also_train: tuple[str, ...] = ()

    def trainable_for(self, shapes: dict) -> tuple[str, ...]:
        paths = list(tree.flatten(shapes))
        rules = self.rules + self.also_train
        if any("{last}" in r for r in rules):
            rules = tuple(r.replace("{last}", str(last_block(paths))) for r in rules)
        tree.resolve_rules([(r, True) for r in rules], paths, what=f"{self.name} rule")
        return rules + head_rules(paths)


@register("bitfit")
def bitfit(also_train=()) -> Selection:
    return Selection(name="bitfit", rules=(r".*/bias",),
                     also_train=as_rules("bitfit", also_train))


@register("ln_tuning")
def ln_tuning(also_train=()) -> Selection:
    return Selection(name="ln_tuning", rules=(r".*norm/(scale|bias)",),
                     also_train=as_rules("ln_tuning", also_train))


@register("lightweight")
def lightweight(also_train=()) -> Selection:
    """Embeddings and the output layer (the head)."""
    return Selection(name="lightweight", rules=(r"embeddings/.*",),
                     also_train=as_rules("lightweight", also_train))


@register("last_layer")
def last_layer(also_train=()) -> Selection:
    """The last block, and the final norm between it and the head where there is one."""
    return Selection(name="last_layer", rules=(r"(encoder|decoder)/(layer_{last}|final_norm)/.*",),
                     also_train=as_rules("last_layer", also_train))
