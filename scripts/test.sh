#!/usr/bin/env bash
# Installs everything the test suite needs, then runs the whole suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_project test,flax,equinox,brainstate,bench
install_data_packages
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
echo "running the tests: python -m pytest -n 2 --dist loadfile $*"
exec python -m pytest -n 2 --dist loadfile "$@"
