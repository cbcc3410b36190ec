#!/usr/bin/env bash
# Run the same jaxscale command on every worker of a Cloud TPU VM slice.
#
#   scripts/tpu_vm_launch.sh --tpu NAME --zone ZONE [--project P] [--dry-run] -- jaxscale train configs/x.yaml k=v ...
#
# Each worker runs the command from the repository checkout at --workdir (default ~/jaxscale),
# with its virtual environment; jax.distributed finds the coordinator by itself on TPU VMs.
# --setup first installs the project on every worker (the README's setup, without the run).
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

tpu="" zone="" project="" workdir="~/jaxscale" dry_run=0 setup=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_vm_launch: unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || { echo "tpu_vm_launch: --tpu, --zone and a command are required" >&2; usage; }

remote_cmd=$(printf '%q ' "$@")
project_flag=()
[[ -n "$project" ]] && project_flag=(--project "$project")

steps=()
if [[ $setup -eq 1 ]]; then
  steps+=("cd $workdir && python3.12 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'")
fi
steps+=("cd $workdir && source .venv/bin/activate && $remote_cmd")

for step in "${steps[@]}"; do
  cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all --command "$step")
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
  fi
done
