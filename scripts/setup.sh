#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install jaxscale with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=""
for candidate in python3.12 python3.13 python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    python_bin="$candidate"; break
  fi
done
if [[ -z "$python_bin" ]]; then
  echo "setup: jaxscale needs Python 3.12 or newer (JAX 0.11+ does); install one, e.g. 'pyenv install 3.12'." >&2
  exit 2
fi

if [[ ! -x .venv/bin/python ]]; then
  "$python_bin" -m venv .venv
fi
# pip's own chatter goes to a log; it is shown only when the install fails.
log=.venv/setup.log
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1 \
   || ! .venv/bin/python -c 'import jax, flax, optax, orbax.checkpoint, grain, jaxscale' 2>>"$log"; then
  cat "$log" >&2
  echo "setup: the install did not complete; pip's messages are above (and in $log)." >&2
  exit 1
fi
