#!/usr/bin/env bash
# The package as users get it: builds the sdist and the wheel (`python -m build`),
# checks them (`twine check --strict`, the wheel holds py.typed), installs the
# wheel with its [flax] and [equinox] extras into a fresh virtual environment and,
# from a folder outside the source tree, runs examples/quickstart.py and one
# sparse example (examples/flax_embedding.py, a short run), each against the
# installed package.
# Usage: bash scripts/test_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
start=$SECONDS
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# pip, quiet; the grep drops pip's warnings about local index folders that lack a
# project (some machines' pip configuration names such folders).
pip_install() {
  local python="$1"
  shift
  PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet \
    --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

echo "wheel: installing build and twine into $tmp/tools..."
python -m venv "$tmp/tools"
pip_install "$tmp/tools/bin/python" "build>=1.2" "twine>=6.1"
echo "wheel: building the sdist and the wheel..."
"$tmp/tools/bin/python" -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 ||
  {
    cat "$tmp/build.log" >&2
    exit 1
  }
"$tmp/tools/bin/python" -m twine check --strict "$tmp"/dist/*
wheel="$(echo "$tmp"/dist/*.whl)"
"$tmp/tools/bin/python" - "$wheel" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
if "optax_sm3/py.typed" not in names:
  raise SystemExit("wheel: the wheel has no optax_sm3/py.typed")
print(f"wheel: {sys.argv[1].rsplit('/', 1)[-1]} holds {len(names)} files")
EOF

echo "wheel: installing it with [flax,equinox] into a fresh environment..."
python -m venv "$tmp/venv"
pip_install "$tmp/venv/bin/python" "$wheel[flax,equinox]"
"$tmp/venv/bin/python" -m pip check

# Outside the source tree, so that `import optax_sm3` can only find the wheel.
mkdir "$tmp/run"
cp examples/quickstart.py examples/flax_embedding.py "$tmp/run/"
cd "$tmp/run"
"$tmp/venv/bin/python" - "$root" <<'EOF'
import pathlib
import sys

import optax_sm3
import optax_sm3.equinox
import optax_sm3.linen
import optax_sm3.nnx

where = pathlib.Path(optax_sm3.__file__).resolve()
if pathlib.Path(sys.argv[1]).resolve() in where.parents:
  raise SystemExit(f"wheel: optax_sm3 was imported from the source tree ({where})")
print(f"wheel: optax_sm3 {optax_sm3.__version__} from {where.parent}")
EOF
echo "wheel: python examples/quickstart.py"
"$tmp/venv/bin/python" quickstart.py | tee "$tmp/quickstart.txt"
grep -q "^SM3 state " "$tmp/quickstart.txt"
echo "wheel: python examples/flax_embedding.py --steps 40"
"$tmp/venv/bin/python" flax_embedding.py --steps 40 | tee "$tmp/sparse.txt"
grep -q "^final loss " "$tmp/sparse.txt"
echo "wheel: passed in $((SECONDS - start)) s"
