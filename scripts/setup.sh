#!/usr/bin/env bash
# Create .venv and install klvae into it, from nothing but Python 3.11+ and pip.
#   bash scripts/setup.sh          the library with both backends, the hub client and the server
#   bash scripts/setup.sh test     the same plus the test dependencies (diffusers is the tests' oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="torch,hub,flax,serve,train,cli"
[ "${1:-}" = "test" ] && extras="$extras,test"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch 2.13.0 installs quickly here; any torch >= 2.4 works with klvae.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[$extras]"
echo "klvae installed in .venv ($extras)"
