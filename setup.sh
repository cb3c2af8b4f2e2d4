#!/usr/bin/env bash
# Sets up everything FSSUAVL needs, then runs a job:
#   bash setup.sh                      set up, build AV-Fashion, run `pretrain.py` with the default config
#   bash setup.sh test [PYTEST_ARGS]   set up, run the test suite (what .ci/run runs)
#   bash setup.sh python SCRIPT ARGS   set up, run any script in the environment
#   bash setup.sh env                  set up only; print the environment's python
# The virtual environment lives outside the clone, under ${XDG_CACHE_HOME:-~/.cache}/fssuavl/, keyed by
# the hash of requirements.txt and the Python version, and is reused while both are unchanged.
# Debian packages for the default data (and the FluidR3 out-of-domain task) are installed with apt-get when running as root; otherwise the
# exact sudo command is printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

APT_PACKAGES=(espeak-ng dataset-fashion-mnist fluidsynth fluid-soundfont-gm)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: the default data needs Debian packages that are not installed. Run:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
key=$( (cat requirements.txt; "$PY" --version) | sha256sum | cut -c1-12)
VENV=${FSSUAVL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fssuavl/venv-$key}
# Two set-ups at once (a test run and a training run started together) must not build into one folder:
# the first takes the lock and builds; the second waits for it, then reuses the result. A venv is trusted
# only when its install finished (.complete) and its python imports torch.
venv_ok() { [ -f "$VENV/.complete" ] && "$VENV/bin/python" -c "import torch, torchaudio, torchvision, yaml" 2>/dev/null; }
if ! venv_ok; then
  mkdir -p "$(dirname "$VENV")"
  exec 9>"$VENV.lock"
  flock 9
  if ! venv_ok; then
    echo "setup: creating $VENV (first time only)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
    touch "$VENV/.complete"
    venv_ok || { echo "setup: the environment in $VENV does not import torch; see the pip output above" >&2; exit 1; }
  fi
  exec 9>&-
fi
PYBIN="$VENV/bin/python"

job=${1:-pretrain}
[ $# -gt 0 ] && shift
case "$job" in
  pretrain)
    "$PYBIN" avfashion.py
    "$PYBIN" pretrain.py "$@"
    ;;
  test)
    # one worker per core, a test file per worker at a time (its module fixtures are built once); the 12 slowest
    exec "$PYBIN" -m pytest -q -n auto --dist loadfile --durations=12 "$@"
    ;;
  python)
    exec "$PYBIN" "$@"
    ;;
  env)
    echo "$PYBIN"
    ;;
  *)
    echo "usage: bash setup.sh [pretrain [ARGS] | test [PYTEST_ARGS] | python SCRIPT [ARGS] | env]" >&2
    exit 2
    ;;
esac
