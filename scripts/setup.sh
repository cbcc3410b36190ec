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
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import jax, flax, optax, orbax.checkpoint, grain, jaxscale' || {
  echo "setup: the install did not complete; see pip's messages above." >&2; exit 1; }
