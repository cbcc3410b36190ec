"""The launch scripts' --dry-run: the exact commands a Cloud TPU VM slice or a SLURM cluster would get."""

import subprocess

from cli_runner import REPO


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", f"scripts/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"TMPDIR": "/tmp"},
    )
    assert result.returncode == 0, result.stderr
    return result


def dry_run(script: str, *args: str) -> list[str]:
    return launch(script, *args).stdout.splitlines()


SETUP_ON_WORKER = (
    r"set\ -e\;\ mkdir\ -p\ jaxscale\ \&\&\ cd\ jaxscale\ \&\&\ find\ .\ -mindepth\ 1\ -maxdepth\ 1\ \!\ -name\ .venv"
    r"\ -exec\ rm\ -rf\ \{\}\ +\ \&\&\ tar\ -xzf\ ~/jaxscale.tar.gz\ \&\&\ if\ python3\ -c\ \'import\ sys\;\ "
    r"sys.exit\(sys.version_info\ \<\ \(3\,\ 12\)\)\'\;\ then\ python3\ -m\ venv\ .venv\;\ else\ \(command\ -v\ uv\ "
    r"\>/dev/null\ \|\|\ curl\ -LsSf\ https://astral.sh/uv/install.sh\ \|\ sh\)\ \&\&\ PATH=\$HOME/.local/bin:\$PATH"
    r"\ uv\ venv\ --seed\ --allow-existing\ --python\ 3.12\ .venv\;\ fi\ \&\&\ .venv/bin/python\ -m\ pip\ install\ -q"
    r"\ -e\ \'.\[tpu\]\' "
)
SSH = "gcloud compute tpus tpu-vm ssh my-v5p --zone us-east5-a --project proj --worker=all --command "
RUN_ON_WORKER = (
    r"cd\ jaxscale\ \&\&\ source\ .venv/bin/activate\ \&\&\ jaxscale\ train\ configs/tiny.yaml\ "
    r"run.dir=gs://my-bucket/runs/tiny\ mesh.fsdp=-1\  "
)
TPU = ["--tpu", "my-v5p", "--zone", "us-east5-a", "--project", "proj", "--dry-run"]
COMMAND = ["--", "jaxscale", "train", "configs/tiny.yaml", "run.dir=gs://my-bucket/runs/tiny", "mesh.fsdp=-1"]
SLURM_COMMAND = ["--", "jaxscale", "train", "configs/tiny.yaml", "run.dir=/shared/runs/tiny", "mesh.fsdp=-1"]


def test_tpu_vm_setup_ships_the_working_tree_and_builds_python_3_12():
    assert dry_run("tpu_vm_launch.sh", *TPU, "--setup", *COMMAND) == [
        "git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf /tmp/jaxscale-my-v5p.tar.gz",
        "gcloud compute tpus tpu-vm scp /tmp/jaxscale-my-v5p.tar.gz my-v5p:jaxscale.tar.gz --zone us-east5-a "
        "--project proj --worker=all ",
        SSH + SETUP_ON_WORKER,
        SSH + RUN_ON_WORKER,
    ]


def test_tpu_vm_setup_of_a_git_revision():
    assert dry_run("tpu_vm_launch.sh", *TPU, "--setup", "--revision", "v1.2", *COMMAND)[0] == (
        "git archive --format=tar.gz -o /tmp/jaxscale-my-v5p.tar.gz v1.2 "
    )


def test_tpu_vm_run_without_setup_is_one_ssh():
    result = launch("tpu_vm_launch.sh", *TPU, *COMMAND)
    assert result.stdout.splitlines() == [SSH + RUN_ON_WORKER]
    assert result.stderr == ""


def test_tpu_vm_run_dir_not_in_a_bucket_is_warned_about():
    result = launch("tpu_vm_launch.sh", *TPU, "--", "jaxscale", "train", "configs/tiny.yaml", "run.dir=runs/tiny")
    assert result.stderr == (
        "tpu_vm_launch: warning: no run.dir=gs://BUCKET/PATH in the command; on a slice of several workers each "
        "would write its part of every checkpoint to its own disk, and no worker could restore.\n"
    )


def test_slurm_batch_script_one_task_per_node_coordinator_from_the_job():
    lines = dry_run(
        "slurm_launch.sh", "--nodes", "4", "--partition", "h100", "--time", "02:00:00", "--workdir", "/shared/js",
        "--dry-run", *SLURM_COMMAND,
    )  # fmt: skip
    assert lines == [
        "#!/bin/bash",
        "#SBATCH --job-name=jaxscale",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --partition=h100",
        "#SBATCH --time=02:00:00",
        "set -euo pipefail",
        "cd /shared/js",
        'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):61234"',
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv/bin/jaxscale train configs/tiny.yaml "
        "run.dir=/shared/runs/tiny mesh.fsdp=-1 ",
        "# submitted with: sbatch, the script above on its standard input",
    ]
