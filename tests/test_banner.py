"""The run banner: one line whose counts match the setup's trees and whose fields all appear."""

import math
import types

import numpy as np

from configs import common
from research import models, tree
from research.train import banner, loop


def tiny_setup(method: dict, engine=None, **overrides):
    config = common.base_config()
    config.model.name = "bert_tiny_classifier"
    config.model.update(engine or {})
    config.model.overrides = dict(num_classes=2, vocab_size=512, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=2, **overrides)
    config.method = method
    config.mesh = dict(data=2, fsdp=2, tensor=2)
    return loop.make_setup(config, loop.build_model(config), 10)


def _fields(line: str) -> dict:
    assert line.startswith("scion: ") and "\n" not in line
    return dict(word.split("=", 1) for word in line[len("scion: "):].split() if "=" in word)


def test_lora_banner_counts_every_leaf_and_the_trainable_ones():
    setup = tiny_setup(dict(name="lora", targets=((r"encoder/.*/kernel", 4),),
                            also_train=(r"classifier/.*",)), dtype="bfloat16")
    state = setup.abstract_state
    leaves = {**tree.flatten(state["trainable"]), **tree.flatten(state["frozen"])}
    base = tree.flatten(setup.model.param_shapes())
    size = {path: math.prod(leaf.shape) for path, leaf in leaves.items()}
    # Every base leaf once (frozen ones held in bfloat16 still count), plus LoRA's factors.
    added = [path for path in size if path not in base]
    assert added and all("lora" in path for path in added)
    total = sum(math.prod(leaf.shape) for leaf in base.values()) + sum(size[p] for p in added)
    trainable = sum(size[p] for p in size if p in added or p.startswith("classifier/"))
    assert trainable == sum(size[path] for path, on in tree.flatten(setup.trainable).items() if on)
    assert 0 < trainable < total

    line = banner.describe(setup)
    fields = _fields(line)
    assert fields == {"backend": "cpu", "devices": "8×cpu", "mesh": "data:2,fsdp:2,tensor:2",
                      "params": banner.human(total), "trainable": banner.human(trainable),
                      "dtype": "bfloat16", "scan_layers": "False", "remat": "none",
                      "attention": "einsum"}
    share = 100 * trainable / total
    assert f"trainable={banner.human(trainable)} ({share:.1f}%) " in line, line


def test_full_fine_tuning_trains_everything_and_shows_the_layout():
    setup = tiny_setup(dict(name="full"), dict(scan_layers=True, remat="full",
                                               attention_impl="fused"))
    # However the scanned stack holds its layers, it has the per-layer model's parameters.
    total = banner.count(tiny_setup(dict(name="full")).model.param_shapes())
    line = banner.describe(setup)
    assert f"params={banner.human(total)} trainable={banner.human(total)} (100.0%)" in line, line
    assert line.endswith(" scan_layers=True remat=full attention=fused"), line


def test_device_kinds_and_shares():
    """A GPU's device kind has spaces: they become ``_``."""
    device = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    mesh = types.SimpleNamespace(devices=np.array([device] * 4, dtype=object).reshape(4, 1, 1),
                                 shape={"data": 4, "fsdp": 1, "tensor": 1})
    params = {"w": np.zeros((1000, 1000)), "b": np.zeros((1000,))}
    setup = types.SimpleNamespace(
        mesh=mesh, model=types.SimpleNamespace(config=models.ModelConfig()),
        abstract_state={"trainable": {"b": params["b"]}, "frozen": {"w": params["w"]}})
    line = banner.describe(setup)
    assert line == ("scion: backend=gpu devices=4×NVIDIA_H100_80GB_HBM3 "
                    "mesh=data:4,fsdp:1,tensor:1 params=1.0M trainable=1.0K (0.1%) "
                    "dtype=float32 scan_layers=False remat=none attention=einsum"), line


def test_human_counts_and_small_shares():
    assert [banner.human(n) for n in (999, 1000, 22_700_000, 1_240_000_000)] == [
        "999", "1.0K", "22.7M", "1.2B"]
    assert banner._percent(3, 10_000) == "0.03%" and banner._percent(0, 0) == "0.0%"
