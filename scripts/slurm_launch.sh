#!/usr/bin/env bash
# Submit a jaxscale command as a SLURM batch job on GPU nodes: one task per node, driving all its GPUs.
#
#   scripts/slurm_launch.sh --nodes N [--gpus-per-node G] [--partition P] [--time HH:MM:SS] [--port PORT]
#                           [--workdir DIR] [--dry-run] -- jaxscale train configs/x.yaml run.dir=SHARED k=v ...
#
# The job runs in --workdir (default: this checkout, on a filesystem every node sees, after scripts/setup.sh)
# with its .venv. run.dir must be shared too (a path on that filesystem, or gs://BUCKET/PATH): every task
# writes its part of each checkpoint there. The coordinator is the job's first node (from
# SLURM_JOB_NODELIST) at --port (default 61234); JAX's SLURM detection gives each task its process count
# and id. SLURM sends SIGTERM two minutes before the time limit: every task saves the same step and exits
# 75; submit again to resume.
# --dry-run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

nodes="" gpus=8 partition="" time_limit="" port=61234 workdir="$(cd "$(dirname "$0")/.." && pwd)" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "slurm_launch: unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$nodes" && $# -gt 0 ]] || { echo "slurm_launch: --nodes and a command are required" >&2; usage; }

batch=$(cat <<SCRIPT
#!/bin/bash
#SBATCH --job-name=jaxscale
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --signal=TERM@120
${partition:+#SBATCH --partition=$partition
}${time_limit:+#SBATCH --time=$time_limit
}set -euo pipefail
cd $(printf '%q' "$workdir")
export JAX_COORDINATOR_ADDRESS="\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1):$port"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv/bin/$(printf '%q ' "$@")
SCRIPT
)
if [[ $dry_run -eq 1 ]]; then
  echo "$batch"
  echo "# submitted with: sbatch, the script above on its standard input"
else
  sbatch <<<"$batch"
fi
