#!/usr/bin/env bash
# Run the same jaxscale command on every worker of a Cloud TPU VM slice.
#
#   scripts/tpu_vm_launch.sh --tpu NAME --zone ZONE [--project P] [--workdir DIR] [--setup [--revision REV]]
#                            [--dry-run] -- jaxscale train configs/x.yaml run.dir=gs://BUCKET/runs/x k=v ...
#
# Each worker runs the command in --workdir (default jaxscale, under the home directory) with its .venv;
# jax.distributed finds the coordinator by itself (JAX's Cloud TPU cluster detection). run.dir must be a
# bucket every worker writes to (each writes its part of every checkpoint); without run.dir=gs://... a
# warning says so (a one-worker slice can use its own disk).
# --setup first ships the code to every worker (this working tree as git sees it, tracked and untracked
# files but not ignored ones; or, with --revision, that git revision) and builds .venv there with
# Python >= 3.12, installed with uv where the image's python3 is older (stock TPU VM images ship 3.10).
# --dry-run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

tpu="" zone="" project="" workdir="jaxscale" dry_run=0 setup=0 revision=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --revision) revision="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_vm_launch: unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || { echo "tpu_vm_launch: --tpu, --zone and a command are required" >&2; usage; }
[[ -z "$revision" || $setup -eq 1 ]] || { echo "tpu_vm_launch: --revision goes with --setup" >&2; usage; }

shared_run_dir=0
for arg in "$@"; do if [[ "$arg" == run.dir=gs://* ]]; then shared_run_dir=1; fi; done
[[ $shared_run_dir -eq 1 ]] || echo "tpu_vm_launch: warning: no run.dir=gs://BUCKET/PATH in the command; on a slice" \
  "of several workers each would write its part of every checkpoint to its own disk, and no worker could restore." >&2

cd "$(dirname "$0")/.."
remote_cmd=$(printf '%q ' "$@")
project_flag=()
[[ -n "$project" ]] && project_flag=(--project "$project")
q_workdir=$(printf '%q' "$workdir")

run() {  # print (dry run) or run one command
  if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all --command "$1"
}

if [[ $setup -eq 1 ]]; then
  bundle="${TMPDIR:-/tmp}/jaxscale-$tpu.tar.gz"
  if [[ -n "$revision" ]]; then
    run git archive --format=tar.gz -o "$bundle" "$revision"
  elif [[ $dry_run -eq 1 ]]; then
    echo "git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(printf '%q' "$bundle")"
  else
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$bundle"
  fi
  run gcloud compute tpus tpu-vm scp "$bundle" "$tpu:jaxscale.tar.gz" --zone "$zone" "${project_flag[@]}" --worker=all
  # Replace the code, keep a built .venv; a python3 older than 3.12 gets a uv-managed 3.12 beside it.
  on_all_workers "set -e; mkdir -p $q_workdir && cd $q_workdir && find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + && tar -xzf ~/jaxscale.tar.gz && if python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then python3 -m venv .venv; else (command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh) && PATH=\$HOME/.local/bin:\$PATH uv venv --seed --allow-existing --python 3.12 .venv; fi && .venv/bin/python -m pip install -q -e '.[tpu]'"
fi
on_all_workers "cd $q_workdir && source .venv/bin/activate && $remote_cmd"
