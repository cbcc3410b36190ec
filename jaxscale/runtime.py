"""Process and device start-up: CPU device emulation and jax.distributed on many hosts."""

from __future__ import annotations

import os

import jax

from jaxscale.config import RuntimeConfig
from jaxscale.errors import UserError

# Environments in which jax.distributed.initialize() finds the coordinator by itself.
_AUTO_DETECTED_CLUSTERS = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def _multi_host_tpu_vm() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(cfg: RuntimeConfig) -> None:
    """Set up devices and, on many hosts, jax.distributed. Call once, before any JAX computation.

    Coordinator, process count and id come from the config, else from the JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables, else from cluster auto-detection
    (Cloud TPU VM pods, SLURM, Open MPI). A single process with none of these stays local.
    """
    # Already so (a second run in one process, e.g. from Python): leave the started backend alone.
    if cfg.cpu_devices > 0 and jax.config.jax_num_cpu_devices != cfg.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)

    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    process_id = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"runtime.coordinator_address is set to '{address}' but runtime.num_processes={num_processes} and "
                f"runtime.process_id={process_id} do not name this process; set both (0 <= process_id < num_processes)."
            )
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    elif _multi_host_tpu_vm() or any(k in os.environ for k in _AUTO_DETECTED_CLUSTERS[1:]):
        jax.distributed.initialize()


def is_main_process() -> bool:
    return jax.process_index() == 0


def shutdown() -> None:
    """Leave the jax.distributed cluster cleanly, if this process joined one."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
