"""Mesh construction and logical-axis rules (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research.train import sharding


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="needs 4 devices, there are 8"):
        sharding.make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(ValueError, match="'model' is not one of"):
        sharding.make_mesh({"model": 8})


def test_rules_first_free_divisible_axis():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    assert sharding.partition_spec(("embed", "mlp"), (384, 1536), mesh, rules) == P("fsdp", "tensor")
    assert sharding.partition_spec(("embed", "heads", "head_dim"), (384, 12, 32), mesh,
                                   rules) == P("fsdp", "tensor", None)
    # 'classes' has no rule, so that axis stays replicated.
    assert sharding.partition_spec(("embed", "classes"), (384, 3), mesh, rules) == P("fsdp", None)
    # A mesh axis is used at most once per array.
    assert sharding.partition_spec(("embed", "embed2"), (8, 8), mesh,
                                   [("embed.*", "fsdp")]) == P("fsdp", None)
    assert sharding.partition_spec(None, (4,), mesh, rules) == P()


def test_batch_sharding_follows_batch_rule():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    spec = sharding.batch_sharding(mesh).spec
    assert spec == P(("data", "fsdp"))
    x = jax.device_put(np.zeros((16, 3)), sharding.batch_sharding(mesh))
    assert x.addressable_shards[0].data.shape == (2, 3)
