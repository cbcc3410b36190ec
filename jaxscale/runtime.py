"""Process and device start-up: CPU device emulation, XLA flags, and jax.distributed on many hosts."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax._src import clusters  # JAX's own cluster detection, the one jax.distributed.initialize() uses

from jaxscale.config import RuntimeConfig
from jaxscale.errors import UserError

log = logging.getLogger("jaxscale.runtime")

# XLA's GPU flags for run-to-run identical results: deterministic reductions and scatters, and an error
# (instead of a silent difference) for any op that has no deterministic kernel. Other backends ignore them.
DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")

# Collectives that overlap with compute (runtime.performance_flags, on by default). GPU, in XLA_FLAGS: the
# latency-hiding scheduler, collectives on their own high-priority stream, FSDP's all-gathers and
# reduce-scatters pipelined across the layer loop, and collectives combined up to 128 MiB (JAX's GPU
# performance guide). TPU, in LIBTPU_INIT_ARGS (read by libtpu only): asynchronous collectives fused
# with compute (MaxText's settings). Other backends ignore them; a flag the user set already wins.
_COMBINE = 128 * 2**20
GPU_PERFORMANCE_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    f"--xla_gpu_all_gather_combine_threshold_bytes={_COMBINE}",
    f"--xla_gpu_reduce_scatter_combine_threshold_bytes={_COMBINE}",
    f"--xla_gpu_all_reduce_combine_threshold_bytes={_COMBINE}",
)
# Not the async collective fusion flags: libtpu refuses to compile for v5p with them ("continuation
# fusion for AllGather ... not supported on platforms other than TPU v5e"), seen through AOT compiles.
TPU_PERFORMANCE_FLAGS = (
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)


def detected_cluster() -> type[clusters.ClusterEnv] | None:
    """The cluster JAX detects this process in (Open MPI, SLURM, GKE TPU, Cloud TPU VM, Kubernetes), or None.

    The same search, in the same order, as jax.distributed.initialize(); opt-in methods (mpi4py) are left out.
    """
    return next(
        (c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present()), None
    )


def distributed_args(cfg: RuntimeConfig) -> dict[str, Any] | None:
    """The arguments for jax.distributed.initialize, or None for one process on its own.

    Explicit settings win: runtime.coordinator_address, runtime.num_processes and runtime.process_id,
    else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. JAX's cluster detection
    fills in whatever they leave unset. Each process drives all of its host's devices.
    """
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
    process_id = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    process_id = process_id if process_id >= 0 else None
    if address is None and detected_cluster() is None:
        if (num_processes or 1) > 1:
            raise UserError(
                f"runtime.num_processes={num_processes} but no coordinator is set or detected; set "
                f"runtime.coordinator_address=HOST:PORT (process 0's host) on every process."
            )
        return None
    # An empty list (not None) keeps JAX from limiting this process to one device, as it does where the
    # cluster names a local rank (SLURM, Open MPI) for the one-process-per-GPU layout.
    address, num_processes, process_id, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        address, num_processes, process_id, [], None, 300
    )
    if num_processes is None or process_id is None or not 0 <= process_id < num_processes:
        raise UserError(
            f"runtime.coordinator_address='{address}' but runtime.num_processes={num_processes} and "
            f"runtime.process_id={process_id} do not name this process; set both (0 <= process_id < num_processes)."
        )
    if num_processes == 1 and not cfg.coordinator_address:
        return None  # a one-host cluster (a single TPU VM, a one-task SLURM job): nothing to coordinate
    return {
        "coordinator_address": address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": [],
    }


def with_flags(existing: str, flags: tuple[str, ...]) -> str:
    """`existing` (a flags variable's value) with each of `flags` added whose name it does not set already."""
    given = {flag.split("=")[0] for flag in existing.split()}
    return " ".join([*existing.split(), *(f for f in flags if f.split("=")[0] not in given)])


def deterministic_xla_flags(xla_flags: str) -> str:
    """`xla_flags` (the XLA_FLAGS value) with XLA's deterministic-ops flags added, unless given already."""
    return with_flags(xla_flags, DETERMINISTIC_XLA_FLAGS)


def initialize(cfg: RuntimeConfig, deterministic: bool = False) -> None:
    """Set up devices and, on many hosts, jax.distributed. Call once, before any JAX computation.

    `deterministic` (train.deterministic) sets XLA's deterministic-ops flags, so a GPU run resumes bit for bit;
    `cfg.performance_flags` the collective/compute overlap flags above.
    """
    # XLA and libtpu read their flags when the backend starts; a backend started earlier (a second run
    # in one Python process) keeps its flags.
    if deterministic:
        os.environ["XLA_FLAGS"] = deterministic_xla_flags(os.environ.get("XLA_FLAGS", ""))
    if cfg.performance_flags:
        os.environ["XLA_FLAGS"] = with_flags(os.environ.get("XLA_FLAGS", ""), GPU_PERFORMANCE_FLAGS)
        os.environ["LIBTPU_INIT_ARGS"] = with_flags(os.environ.get("LIBTPU_INIT_ARGS", ""), TPU_PERFORMANCE_FLAGS)
    # Already so (a second run in one process, e.g. from Python): leave the started backend alone.
    if cfg.cpu_devices > 0 and jax.config.jax_num_cpu_devices != cfg.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
    args = distributed_args(cfg)
    if args is not None and not jax.distributed.is_initialized():
        log.info(
            "jax.distributed: process %d of %d, coordinator %s",
            args["process_id"],
            args["num_processes"],
            args["coordinator_address"],
        )
        jax.distributed.initialize(**args)


def is_main_process() -> bool:
    return jax.process_index() == 0


def shutdown() -> None:
    """Leave the jax.distributed cluster cleanly, if this process joined one."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
