"""What a device can do: peak FLOP/s for MFU, and a catalog of accelerators for planning.

Every number is the vendor's public spec-sheet figure (dense bf16, no sparsity); the source is
cited beside it. Bandwidths are in bytes per second, one direction, per device: a spec sheet's
"bidirectional" figure is halved. Where a sheet gives no figure, the comment says what was assumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaxscale.errors import UserError
from jaxscale.units import GIB

GB = 1e9


@dataclass(frozen=True)
class Accelerator:
    """One kind of device, as the planner sees it. Bandwidths in bytes/s, one direction, per device."""

    name: str
    device_kinds: tuple[str, ...]  # as jax.Device.device_kind reports it
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    fast_bandwidth: float  # ICI (TPU) or NVLink (GPU): within a slice or a node
    fast_domain: int  # most devices the fast links join: a TPU pod slice, a GPU node
    network_bandwidth: float  # DCN (TPU) or the NIC (GPU): between slices or nodes
    name_counts_cores: bool = False  # TPU v4 / v5p names count TensorCores: v5p-256 is 128 chips
    hbm_bandwidth: float = 0.0  # bytes/s of the device's own memory
    fp32_peak_flops: float | None = None  # float32 matmuls (TF32 tensor cores on GPUs); None: not published
    platform: str = "tpu"  # as jax.Device.platform names it: what XLA backend compiles for it


ACCELERATORS: dict[str, Accelerator] = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB HBM2 at 1200 GB/s, pods of 4096 chips, 4 chips
    # per host. ICI: 6 links x 50 GB/s per direction (TPU v4 paper, Jouppi et al., ISCA 2023); the DCN
    # figure is not published: assumed as v5p's 50 Gbps per chip.
    "v4": Accelerator(
        "v4",
        ("TPU v4",),
        275e12,
        32 * GIB,
        300 * GB / 2,
        4096,
        50e9 / 8,
        name_counts_cores=True,
        hbm_bandwidth=1200 * GB,
    ),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional
    # per chip, 8 chips per host, 256-chip pods, 2 x 100 Gbps NICs per host (25 Gbps per chip).
    "v5e": Accelerator(
        "v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 400 * GB / 2, 256, 25e9 / 8, hbm_bandwidth=819 * GB
    ),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GB HBM2e at 2765 GB/s, ICI 1200 GB/s bidirectional
    # per chip, DCN 50 Gbps per chip, 4 chips per host, slices up to 6144 chips.
    "v5p": Accelerator(
        "v5p",
        ("TPU v5p", "TPU v5"),
        459e12,
        95 * GIB,
        1200 * GB / 2,
        6144,
        50e9 / 8,
        name_counts_cores=True,
        hbm_bandwidth=2765 * GB,
    ),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional per
    # chip, 8 chips per host, 256-chip pods. DCN per host is not in the table: assumed as v5e's 25 Gbps per chip.
    "v6e": Accelerator(
        "v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 800 * GB / 2, 256, 25e9 / 8, hbm_bandwidth=1638 * GB
    ),
    # nvidia.com A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 156 TF32, 80 GB HBM2e at 2039 GB/s, NVLink
    # 600 GB/s bidirectional; DGX A100: 8 GPUs per node, one 200 Gb/s HDR InfiniBand port per GPU.
    "a100": Accelerator(
        "a100",
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
        312e12,
        80 * GB,
        600 * GB / 2,
        8,
        200e9 / 8,
        hbm_bandwidth=2039 * GB,
        fp32_peak_flops=156e12,
        platform="gpu",
    ),
    # nvidia.com H100 datasheet (SXM): 989 TFLOP/s bf16 dense (1979 with sparsity), 494 TF32 dense, 80 GB HBM3 at
    # 3.35 TB/s, NVLink 900 GB/s bidirectional; DGX H100: 8 GPUs, one 400 Gb/s NDR port per GPU.
    "h100": Accelerator(
        "h100",
        ("NVIDIA H100 80GB HBM3",),
        989e12,
        80 * GB,
        900 * GB / 2,
        8,
        400e9 / 8,
        hbm_bandwidth=3350 * GB,
        fp32_peak_flops=494e12,
        platform="gpu",
    ),
    # nvidia.com H200 datasheet (SXM): 989 TFLOP/s bf16 dense, 494 TF32 dense, 141 GB HBM3e at 4.8 TB/s,
    # NVLink 900 GB/s bidirectional; HGX H200: 8 GPUs per node, 400 Gb/s per GPU as for H100.
    "h200": Accelerator(
        "h200",
        ("NVIDIA H200",),
        989e12,
        141 * GB,
        900 * GB / 2,
        8,
        400e9 / 8,
        hbm_bandwidth=4800 * GB,
        fp32_peak_flops=494e12,
        platform="gpu",
    ),
    # Emulated CPU devices share one host: no spec sheet. Nominal figures, for exercising the planner
    # and comparing it with XLA:CPU; its times mean nothing.
    "cpu": Accelerator(
        "cpu", ("cpu",), 1e12, 16 * GIB, 50 * GB, 1 << 20, 50 * GB, hbm_bandwidth=50 * GB, platform="cpu"
    ),
}


def accelerator_of(device_kind: str) -> Accelerator | None:
    """The catalog entry of a device kind as jax.Device.device_kind reports it; None when unknown (e.g. CPU)."""
    for acc in ACCELERATORS.values():
        if acc.name == "cpu":
            continue
        for kind in acc.device_kinds:
            if device_kind == kind or device_kind.startswith(kind):
                return acc
    return None


def peak_flops(device_kind: str, compute_dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device of this kind in `compute_dtype`, or None when unknown (e.g. CPU)."""
    acc = accelerator_of(device_kind)
    if acc is None:
        return None
    return acc.fp32_peak_flops if compute_dtype == "float32" else acc.peak_flops


@dataclass(frozen=True)
class Cluster:
    """`count` devices of one accelerator, as a name like v5p-256, h100x64 or cpu-8 describes them."""

    name: str
    accelerator: Accelerator
    devices: int


_TPU_NAME = re.compile(r"(v4|v5e|v5p|v6e)-(\d+)")
_GPU_NAME = re.compile(r"(a100|h100|h200)x(\d+)")
_CPU_NAME = re.compile(r"cpu-(\d+)")


def parse_cluster(name: str) -> Cluster:
    """Cluster from a name: TPU `v5p-256` (v4/v5p count TensorCores, 2 per chip), `v5e-16`, `v6e-64`;
    GPU `h100x64`, `a100x8`, `h200x16`; emulated `cpu-8`."""
    text = name.strip().lower()
    if m := _TPU_NAME.fullmatch(text):
        acc, count = ACCELERATORS[m.group(1)], int(m.group(2))
        devices = count // 2 if acc.name_counts_cores else count
        if devices < 1 or (acc.name_counts_cores and count % 2):
            raise UserError(f"--hardware {name}: {acc.name} names count TensorCores, two per chip; use an even number.")
    elif m := _GPU_NAME.fullmatch(text):
        acc, devices = ACCELERATORS[m.group(1)], int(m.group(2))
    elif m := _CPU_NAME.fullmatch(text):
        acc, devices = ACCELERATORS["cpu"], int(m.group(1))
    else:
        raise UserError(
            f"Unknown hardware '{name}'. Name a TPU slice (v4-N, v5e-N, v5p-N, v6e-N), GPUs (a100xN, h100xN, "
            f"h200xN) or emulated CPU devices (cpu-N), e.g. v5p-256, h100x64, cpu-8."
        )
    if devices < 1:
        raise UserError(f"--hardware {name} has no devices; give a positive count.")
    return Cluster(text, acc, devices)
