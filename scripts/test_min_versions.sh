#!/usr/bin/env bash
# Runs the tests against the lowest versions that pyproject.toml declares, each set
# in its own fresh virtual environment, so the declared lower bounds stay true:
#   core     jax, optax, numpy and the [test] tools at their bounds, no extra:
#            every test that needs no extra, doctests included;
#   flax, equinox, brainstate
#            the same pins plus the extra's, raised where the extra asks for more
#            (`[flax]` names jax 0.10.0): the test files and library modules that
#            use the extra (scripts/_min_versions.py picks them, so a new file
#            joins its extra's run by itself).
# Usage: bash scripts/test_min_versions.sh [extra pytest arguments]
#   all      every extra at its bounds: the test files that import the modules of
#            two extras or more at their top level (they fit no one set).
# MIN_SETS="core flax" runs only those sets (default: all five).
# MIN_VENV=DIR keeps each set's environment in DIR/SET (default: a temporary
# folder, removed after).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
sets="${MIN_SETS:-core flax equinox brainstate all}"

if [[ -n "${MIN_VENV:-}" ]]; then
  venvs="$MIN_VENV"
  mkdir -p "$venvs"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  venvs="$tmp"
fi

# make_venv SET [EXTRA...]: a fresh $venvs/SET holding optax-sm3 and every pin of
# `dependencies`, `[test]` and the extras (each at its `>=` bound, the highest
# where two name one package; jaxlib at jax's). Fails if pip installs another
# version or reports a broken requirement. Sets $venv.
make_venv() {
  local set="$1" pins
  shift
  venv="$venvs/$set"
  pins="$(python scripts/_min_versions.py pins "$@")"
  echo "min-versions [$set]: creating a virtual environment in $venv..."
  rm -rf "$venv"
  python -m venv "$venv"
  echo "min-versions [$set]: installing optax-sm3 with $pins..."
  # The grep drops pip's warnings about local index folders that lack a project
  # (some machines' pip configuration names such folders).
  # shellcheck disable=SC2086  # $pins is a list of words.
  PIP_ROOT_USER_ACTION=ignore "$venv/bin/python" -m pip install --quiet \
    --disable-pip-version-check . $pins \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$venv/bin/python" -m pip check
  "$venv/bin/python" - "$set" $pins <<'EOF'
import importlib.metadata as md
import sys


def norm(v):  # "8.0" and "8.0.0" are one version
  parts = v.split(".")
  while len(parts) > 1 and parts[-1] == "0":
    parts.pop()
  return parts


set_name, *pins = sys.argv[1:]
wanted = dict(p.split("==") for p in pins)
got = {name: md.version(name) for name in wanted}
bad = {n: (wanted[n], got[n]) for n in wanted if norm(got[n]) != norm(wanted[n])}
if bad:
  raise SystemExit(f"min-versions [{set_name}]: installed versions differ: {bad}")
print(f"min-versions [{set_name}]:", ", ".join(f"{n} {v}" for n, v in got.items()))
EOF
}

# run_tests SET PYTEST-ARGUMENTS...: pytest in the set's environment. Property
# tests run the "dev" profile's 25 examples from a fixed seed: these runs look for
# API breaks in old releases, scripts/test.sh runs the full "ci" profile.
run_tests() {
  local set="$1" rc=0
  shift
  echo "min-versions [$set]: running the tests..."
  HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-dev}" "$venv/bin/python" -m pytest -n 2 \
    -p no:cacheprovider --hypothesis-seed=0 "$@" || rc=$?
  if ((rc == 5)); then
    echo "min-versions [$set]: FAILED: pytest collected no tests" >&2
    exit 1
  elif ((rc != 0)); then
    echo "min-versions [$set]: FAILED (pytest exit code $rc)" >&2
    exit "$rc"
  fi
  echo "min-versions [$set]: passed ($((SECONDS - start)) s so far)"
}

for set in $sets; do
  case "$set" in
    core)
      make_venv core
      # The test files and modules that need an extra (Flax, Equinox, orbax,
      # brainstate, the benchmarks' data, the built docs) are left out; every
      # other test file and the doctests run. Test files that import an extra
      # at their top level are found by scripts/_min_versions.py.
      # shellcheck disable=SC2046  # a list of options without spaces.
      run_tests core tests optax_sm3 $(python scripts/_min_versions.py core-ignores) \
        --ignore=tests/test_brainstate.py \
        --ignore=tests/test_benchmarks.py \
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
        "$@"
      ;;
    flax | equinox | brainstate)
      make_venv "$set" "$set"
      # shellcheck disable=SC2046  # a list of paths without spaces.
      run_tests "$set" $(python scripts/_min_versions.py files "$set") "$@"
      ;;
    all)
      files="$(python scripts/_min_versions.py files all)"
      if [[ -z "$files" ]]; then
        echo "min-versions [all]: no test file needs two extras; skipped"
        continue
      fi
      make_venv all flax equinox brainstate
      # shellcheck disable=SC2086  # a list of paths without spaces.
      run_tests all $files "$@"
      ;;
    *)
      echo "min-versions: unknown set $set (core, flax, equinox, brainstate, all)" >&2
      exit 2
      ;;
  esac
done
echo "min-versions: passed in $((SECONDS - start)) s"
