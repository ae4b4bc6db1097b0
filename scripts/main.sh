#!/usr/bin/env bash
# The project's main job: SM3 against Adam & co on real data (see README).
# With no flags it trains MovieLens-100k only and prints that one results table
# (about 5 minutes on 2 cores, after the installs); --workloads all adds the
# three other workloads' tables (904 s).
# Usage: bash scripts/main.sh [benchmark flags, e.g. --quick or --workloads all]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_project bench
install_data_packages
echo "running the benchmarks: python -m benchmarks $*"
exec python -m benchmarks "$@"
