"""Peak dense bf16 FLOP/s per device, by the device_kind JAX reports, for MFU.

Numbers are vendor spec-sheet figures (dense, no sparsity):
- TPU v4: 275 TFLOP/s per chip (cloud.google.com/tpu/docs/v4). JAX shows one device per chip (megacore).
- TPU v5e (v5 lite): 197 TFLOP/s (cloud.google.com/tpu/docs/v5e).
- TPU v5p: 459 TFLOP/s (cloud.google.com/tpu/docs/v5p).
- TPU v6e (Trillium): 918 TFLOP/s (cloud.google.com/tpu/docs/v6e).
- A100 80GB: 312 TFLOP/s (nvidia.com A100 datasheet).
- H100 SXM: 989 TFLOP/s; H200: 989 TFLOP/s (nvidia.com H100 / H200 datasheets).
"""

from __future__ import annotations

PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind, or None when unknown (e.g. CPU)."""
    if device_kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[device_kind]
    for kind, flops in PEAK_BF16_FLOPS.items():
        if device_kind.startswith(kind):
            return flops
    return None
