"""Start-up: jax.distributed arguments derived by JAX's cluster detection in faked cluster environments.

Each test fakes one cluster's environment (and, for Cloud TPU, its metadata server) and checks the
arguments jaxscale would pass to jax.distributed.initialize; nothing connects anywhere.
"""

import os
import subprocess
import sys

import pytest
from jax._src.clusters import cloud_tpu_cluster

from jaxscale import runtime
from jaxscale.config import RuntimeConfig
from jaxscale.errors import UserError

CLUSTER_VARS = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    """No cluster in the environment, whatever machine runs the tests."""
    for name in list(os.environ):
        if name.startswith(CLUSTER_VARS) or name == "KUBERNETES_SERVICE_HOST":
            monkeypatch.delenv(name)


@pytest.fixture
def cloud_tpu_vm(monkeypatch):
    """A Cloud TPU VM, worker 1 of a 2-host slice, as its metadata server describes it."""
    metadata = {"agent-worker-number": "1", "worker-network-endpoints": "127.0.0.2,127.0.0.3", "tpu-env": ""}
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))


def test_one_process_without_a_cluster_stays_local():
    assert runtime.distributed_args(RuntimeConfig()) is None


def test_slurm(monkeypatch):
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "2"}
    for k, v in (env | {"SLURM_PROCID": "1", "SLURM_LOCALID": "0"}).items():
        monkeypatch.setenv(k, v)
    # JAX's SLURM port: the job id mod 4096 above 61440. Every GPU of the host stays visible.
    expected = {"coordinator_address": "gpu007:61586", "num_processes": 2, "process_id": 1, "local_device_ids": []}
    assert runtime.distributed_args(RuntimeConfig()) == expected


def test_open_mpi(monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://127.0.0.9,10.148.0.1:34911")
    for k, v in {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    args = runtime.distributed_args(RuntimeConfig())
    assert args == {
        "coordinator_address": "127.0.0.9:62624",
        "num_processes": 4,
        "process_id": 2,
        "local_device_ids": [],
    }


def test_gke_tpu(monkeypatch, cloud_tpu_vm):
    """On GKE the environment names the workers; the metadata server is not the TPU VM's."""
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: ("", 404))
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7")
    monkeypatch.setenv("TPU_WORKER_ID", "3")
    args = runtime.distributed_args(RuntimeConfig())
    assert args == {
        "coordinator_address": "127.0.0.4:8482",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": [],
    }


def test_cloud_tpu_vm_without_worker_hostnames(cloud_tpu_vm):
    """A plain Cloud TPU VM sets no TPU_WORKER_HOSTNAMES: the metadata server names the workers."""
    args = runtime.distributed_args(RuntimeConfig())
    assert args == {
        "coordinator_address": "127.0.0.2:8482",
        "num_processes": 2,
        "process_id": 1,
        "local_device_ids": [],
    }


def test_explicit_settings_win_over_the_cluster(cloud_tpu_vm):
    cfg = RuntimeConfig(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0)
    args = runtime.distributed_args(cfg)
    assert args == {
        "coordinator_address": "127.0.0.1:1234",
        "num_processes": 2,
        "process_id": 0,
        "local_device_ids": [],
    }


def test_environment_settings_win_over_the_cluster(monkeypatch, cloud_tpu_vm):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:4321")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    args = runtime.distributed_args(RuntimeConfig())
    assert args == {
        "coordinator_address": "127.0.0.1:4321",
        "num_processes": 2,
        "process_id": 0,
        "local_device_ids": [],
    }


def test_explicit_coordinator_without_process_id_is_refused():
    with pytest.raises(UserError, match=r"runtime.process_id=None do not name this process; set both"):
        runtime.distributed_args(RuntimeConfig(coordinator_address="127.0.0.1:1234", num_processes=2))


def test_many_processes_without_a_coordinator_are_refused():
    with pytest.raises(UserError, match=r"runtime.num_processes=2 but no coordinator .* runtime.coordinator_address="):
        runtime.distributed_args(RuntimeConfig(num_processes=2, process_id=0))


def test_deterministic_adds_xla_flags_and_keeps_the_users():
    flags = runtime.deterministic_xla_flags("--xla_dump_to=/tmp/x --xla_gpu_exclude_nondeterministic_ops=false")
    assert flags.split() == [
        "--xla_dump_to=/tmp/x",
        "--xla_gpu_exclude_nondeterministic_ops=false",
        "--xla_gpu_deterministic_ops=true",
    ]


def test_deterministic_flags_are_accepted_by_xla():
    """XLA aborts on a flag it does not know: the flags must parse (here on the CPU backend)."""
    code = "import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    env = os.environ | {"XLA_FLAGS": runtime.deterministic_xla_flags(""), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "6.0", result.stderr[-2000:]


def test_initialize_with_deterministic_sets_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    runtime.initialize(RuntimeConfig(performance_flags=False), deterministic=True)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", *runtime.DETERMINISTIC_XLA_FLAGS]


def test_performance_flags_are_set_by_default_the_users_win_and_they_switch_off(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")
    runtime.initialize(RuntimeConfig())
    xla, libtpu = os.environ["XLA_FLAGS"].split(), os.environ["LIBTPU_INIT_ARGS"].split()
    assert xla[0] == "--xla_gpu_enable_latency_hiding_scheduler=false" and len(xla) == len(
        runtime.GPU_PERFORMANCE_FLAGS
    )
    assert set(runtime.GPU_PERFORMANCE_FLAGS[1:]) <= set(xla) and libtpu == list(runtime.TPU_PERFORMANCE_FLAGS)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")
    runtime.initialize(RuntimeConfig(performance_flags=False))
    assert os.environ["XLA_FLAGS"] == os.environ["LIBTPU_INIT_ARGS"] == ""


def test_the_gpu_performance_flags_are_accepted_by_xla():
    """XLA aborts on a flag it does not know: the GPU flags must parse (here on the CPU backend)."""
    code = "import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    env = os.environ | {"XLA_FLAGS": " ".join(runtime.GPU_PERFORMANCE_FLAGS), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "6.0", result.stderr[-2000:]
