#!/usr/bin/env bash
# Runs the core tests (those that need only jax, optax, numpy and the [test] tools)
# against the lowest versions that pyproject.toml declares, in a fresh virtual
# environment, so the declared lower bounds stay true.
# Usage: bash scripts/test_min_versions.sh [extra pytest arguments]
# MIN_VENV=DIR keeps the environment in DIR (default: a temporary folder, removed after).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

if [[ -n "${MIN_VENV:-}" ]]; then
  venv="$MIN_VENV"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  venv="$tmp/venv"
fi

# Every runtime dependency and [test] tool at the exact version of its `>=` bound
# (jaxlib at jax's, as jax pins it). A dependency without a `>=` bound is an error.
pins="$(
  python - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
  project = tomllib.load(f)["project"]
pins = []
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
  m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", req)
  if m is None:
    raise SystemExit(f"pyproject.toml: {req!r} has no plain '>=' lower bound to test")
  pins.append(f"{m[1]}=={m[2]}")
  if m[1] == "jax":
    pins.append(f"jaxlib=={m[2]}")
print(" ".join(pins))
EOF
)"

echo "min-versions: creating a virtual environment in $venv..."
python -m venv "$venv"
echo "min-versions: installing optax-sm3 with $pins..."
# The grep drops pip's warnings about local index folders that lack a project
# (some machines' pip configuration names such folders).
# shellcheck disable=SC2086  # $pins is a list of words.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check . $pins \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$venv/bin/python" -m pip check
"$venv/bin/python" - <<EOF
import importlib.metadata as md
def norm(v):  # "8.0" and "8.0.0" are one version
  parts = v.split(".")
  while len(parts) > 1 and parts[-1] == "0":
    parts.pop()
  return parts

wanted = dict(p.split("==") for p in "$pins".split())
got = {name: md.version(name) for name in wanted}
bad = {n: (wanted[n], got[n]) for n in wanted if norm(got[n]) != norm(wanted[n])}
if bad:
  raise SystemExit(f"min-versions: installed versions differ from the pins: {bad}")
print("min-versions:", ", ".join(f"{n} {v}" for n, v in got.items()))
EOF

# The test files and modules that need an extra (Flax, Equinox, orbax,
# brainstate, the benchmarks' data, the built docs) are left out; every other test file and the
# doctests run. Property tests run the "dev" profile's 25 examples from a
# fixed seed: this phase looks for API breaks in old releases, scripts/test.sh
# runs the full "ci" profile.
echo "min-versions: running the core tests..."
rc=0
HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-dev}" "$venv/bin/python" -m pytest -n 2 \
  -p no:cacheprovider --hypothesis-seed=0 tests optax_sm3 \
  --ignore=tests/test_brainstate.py \
  --ignore=tests/test_benchmarks.py \
  --ignore=tests/test_benchmarks_recipes.py \
  --ignore=tests/test_benchmarks_workloads.py \
  --ignore=tests/test_checkpoint.py \
  --ignore=tests/test_examples_flax.py \
  --ignore=tests/test_flax.py \
  --ignore=tests/test_linen_sparse.py \
  --ignore=tests/test_nnx_sparse.py \
  --ignore=tests/test_docs.py \
  --ignore=tests/test_equinox.py \
  --ignore=optax_sm3/equinox.py \
  --ignore=optax_sm3/_sparse/_equinox.py \
  --ignore=optax_sm3/_sparse/_nnx_accumulate.py \
  --deselect=tests/test_docs_donation.py::test_benchmark_runs_and_both_paths_agree \
  --ignore=optax_sm3/nnx.py \
  --ignore=optax_sm3/linen.py \
  --ignore=optax_sm3/_sparse/_nnx.py \
  --ignore=optax_sm3/_sparse/_nnx_grad.py \
  --ignore=optax_sm3/_sparse/_nnx_optimizer.py \
  --ignore=optax_sm3/_sparse/_linen.py \
  --deselect=tests/test_readme.py::test_flax_sparse_example_output_matches_readme \
  --deselect=tests/test_sharding.py::test_multiprocess_example_matches_single_process \
  "$@" || rc=$?
if ((rc == 5)); then
  echo "min-versions: FAILED: pytest collected no tests" >&2
  exit 1
elif ((rc != 0)); then
  echo "min-versions: FAILED (pytest exit code $rc)" >&2
  exit "$rc"
fi
echo "min-versions: passed in $((SECONDS - start)) s"
