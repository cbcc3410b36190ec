"""Mesh from config: auto-fill, ICI x DCN layout, and errors that say which degree is wrong."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxscale.config import MeshConfig
from jaxscale.errors import UserError
from jaxscale.mesh import build_mesh, resolve_axis_sizes
from jaxscale.sharding import logical_to_spec, make_rules


def test_minus_one_fills_the_remaining_devices():
    sizes = resolve_axis_sizes(MeshConfig(data=2, fsdp=-1, tensor=2), 8)
    assert sizes == {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}


def test_product_that_does_not_match_the_devices_is_refused():
    with pytest.raises(UserError, match=r"mesh\.data=2, mesh\.fsdp=3 has 6 devices per slice but there are 8"):
        resolve_axis_sizes(MeshConfig(data=2, fsdp=3), 8)
    with pytest.raises(UserError, match="Only one mesh axis may be -1"):
        resolve_axis_sizes(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(UserError, match=r"mesh\.fsdp=-1 cannot fill the mesh"):
        resolve_axis_sizes(MeshConfig(fsdp=-1, tensor=3), 8)


def test_dcn_axis_keeps_each_slice_contiguous():
    mesh = build_mesh(MeshConfig(fsdp=-1, tensor=2, dcn_data=2))
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    first_slice = {d.id for d in mesh.devices[0].reshape(-1)}
    assert first_slice == {d.id for d in jax.devices()[:4]}


def test_rules_map_logical_names_and_skip_axes_that_do_not_divide():
    mesh = build_mesh(MeshConfig(fsdp=2, tensor=4))
    rules = make_rules("fsdp_tp", {"mlp": ["tensor"]})
    assert logical_to_spec(("embed", "mlp"), (128, 384), rules, mesh) == P("fsdp", "tensor")
    # Two KV heads cannot split four ways: replicated along tensor instead of failing.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (128, 2, 32), rules, mesh) == P("fsdp", None, None)
    assert logical_to_spec(("batch", "seq"), (16, 128), rules, mesh) == P("fsdp", None)


def test_unknown_strategy_and_bad_rule_are_refused():
    with pytest.raises(UserError, match="Unknown mesh.strategy 'zero9'. Known strategies: dp, fsdp, fsdp_tp"):
        make_rules("zero9")
    with pytest.raises(UserError, match=r"mesh\.rules\.mlp must be a mesh axis name"):
        make_rules("fsdp", {"mlp": 3})
