"""Device mesh from config: named axes, -1 auto-fill, ICI x DCN (multi-slice) layout."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from jaxscale.config import MeshConfig
from jaxscale.errors import UserError

# Slowest-changing first: `tensor` is innermost so it lands on the fastest links, `context` (which
# gathers keys and values every layer) next to it.
AXES = ("data", "pipeline", "fsdp", "expert", "context", "tensor")


def resolve_axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Total size of every axis (ICI degree x DCN degree), with a -1 ICI degree filled in."""
    dcn = {a: getattr(cfg, f"dcn_{a}") for a in AXES}
    ici = {a: getattr(cfg, a) for a in AXES}
    for name, size in [*ici.items(), *((f"dcn_{a}", s) for a, s in dcn.items())]:
        if size == 0 or size < -1 or (name.startswith("dcn_") and size < 1):
            raise UserError(
                f"mesh.{name}={size} is not a valid degree; use a positive integer (or -1 for one ICI axis)."
            )
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        raise UserError(
            f"The DCN degrees multiply to {num_slices} slices, which does not divide the {num_devices} devices; "
            f"change mesh.dcn_* so that their product divides {num_devices}."
        )
    per_slice = num_devices // num_slices
    auto = [a for a, s in ici.items() if s == -1]
    if len(auto) > 1:
        raise UserError(f"Only one mesh axis may be -1, got {', '.join('mesh.' + a for a in auto)}; fix all but one.")
    fixed = math.prod(s for s in ici.values() if s != -1)
    if auto:
        if per_slice % fixed:
            raise UserError(
                f"mesh.{auto[0]}=-1 cannot fill the mesh: the other axes multiply to {fixed}, which does not divide "
                f"the {per_slice} devices per slice; change {_degrees(ici)}."
            )
        ici[auto[0]] = per_slice // fixed
    if math.prod(ici.values()) != per_slice:
        raise UserError(
            f"The mesh {_degrees(ici)} has {math.prod(ici.values())} devices per slice but there are {per_slice} "
            f"({num_devices} devices in {num_slices} slice(s)); make the product {per_slice}, or set one axis to -1."
        )
    return {a: ici[a] * dcn[a] for a in AXES}


def _degrees(sizes: dict[str, int]) -> str:
    return ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s != 1) or "all axes 1"


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes AXES (Auto axis types: GSPMD propagates shardings between our constraints)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(cfg, len(devices))
    dcn_shape = [getattr(cfg, f"dcn_{a}") for a in AXES]
    ici_shape = [sizes[a] // d for a, d in zip(AXES, dcn_shape, strict=True)]
    if math.prod(dcn_shape) > 1 and hasattr(devices[0], "slice_index"):
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
    elif math.prod(dcn_shape) > 1:
        grid = _emulated_hybrid_grid(devices, ici_shape, dcn_shape)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.array(devices).reshape(ici_shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _emulated_hybrid_grid(devices: list[jax.Device], ici_shape: list[int], dcn_shape: list[int]) -> np.ndarray:
    """Without real slices, each contiguous block of devices (in process order) stands for one slice.

    Axis `a` of the result has size dcn[a] * ici[a], slice-major: neighbours along an axis share a slice.
    """
    n = len(AXES)
    grid = np.array(devices).reshape(*dcn_shape, *ici_shape)
    interleaved = grid.transpose([i for a in range(n) for i in (a, n + a)])
    return interleaved.reshape([d * i for d, i in zip(dcn_shape, ici_shape, strict=True)])


def abstract_mesh(axis_sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh with the trainer's axis names and order (missing axes: size 1)."""
    return AbstractMesh(tuple(axis_sizes.get(a, 1) for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))
