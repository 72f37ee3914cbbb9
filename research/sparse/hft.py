"""HFT (Hui et al., 2024, "HFT: Half Fine-Tuning for Large Language Models"): each round trains a
freshly drawn half of the parameter blocks and freezes the other half, which keeps much of the
pretrained knowledge while the trained half learns the task.

The half is drawn per layer, as the paper does for LLaMA: two of the four attention matrices
(query, key, value, out), and half of the FFN matrices: one of two (BERT, ViT: wi, wo), or of
three (Llama: gate, up, down) one in a random half of the layers and two in the others. A block
is a matrix with its bias. Norms, embeddings and the pooler stay frozen; the task head trains
(a classifier starts from scratch). The draw depends on ``(seed, round)`` only, so a round is
reproducible and successive rounds train different halves. Round r is one run starting from
round r-1's last checkpoint (``config.model.init_from``; see ``configs/minilm_hft.py``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from research import tree
from research.methods import Method, register
from research.sparse.selection import as_rules, head_rules

_MATRIX = re.compile(r"(?P<layer>.*/layer_(?P<index>\d+))/(?P<sub>attn|mlp)/(?P<name>[^/]+)/kernel")


def candidate_blocks(paths) -> dict[tuple, list[str]]:
    """The blocks HFT chooses from, grouped by ``(layer index, layer path, 'attn' | 'mlp')``:
    module paths (``encoder/layer_0/attn/query``), sorted so a draw never depends on order."""
    groups: dict[tuple, list[str]] = {}
    for path in paths:
        if match := _MATRIX.fullmatch(path):
            key = (int(match["index"]), match["layer"], match["sub"])
            groups.setdefault(key, []).append(path[:-len("/kernel")])
    if not groups:
        near = tree.closest_paths("encoder/layer_0/attn/query/kernel", paths)
        raise ValueError("hft: no attention or MLP matrices ('<stack>/layer_<i>/(attn|mlp)/"
                         f"<name>/kernel') among the params; closest: {near}")
    return {key: sorted(groups[key]) for key in sorted(groups)}


def draw_half(paths, seed: int, round: int) -> list[str]:
    """The trainable blocks of ``round``: half of each layer's attention matrices and half of
    its FFN matrices; an odd count takes the smaller half in a random half of the layers."""
    rng = np.random.default_rng([seed, round])
    groups = candidate_blocks(paths)
    chosen = []
    for sublayer in ("attn", "mlp"):
        keys = [key for key in groups if key[2] == sublayer]
        smaller = set(rng.permutation(len(keys))[:len(keys) // 2].tolist())
        for position, key in enumerate(keys):
            members = groups[key]
            count = len(members) // 2 if position in smaller else len(members) - len(members) // 2
            chosen += [members[i] for i in sorted(rng.permutation(len(members))[:count])]
    return chosen


@register("hft")
@dataclasses.dataclass(frozen=True)
class HFT(Method):
    """``config.method = dict(name='hft', round=r, seed=s, also_train=(regex, ...))``."""
    round: int = 0
    seed: int = 0
    also_train: tuple[str, ...] = ()

    def __post_init__(self):
        for key in ("round", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config.method.{key} for 'hft' must be an integer >= 0, "
                                 f"got {value!r}")
        object.__setattr__(self, "also_train", as_rules("hft", self.also_train))

    def trainable_for(self, shapes: dict) -> tuple[str, ...]:
        paths = list(tree.flatten(shapes))
        tree.resolve_rules([(r, True) for r in self.also_train], paths, what="hft also_train rule")
        half = tuple(re.escape(block) + "/.*" for block in draw_half(paths, self.seed, self.round))
        return half + head_rules(paths) + self.also_train
