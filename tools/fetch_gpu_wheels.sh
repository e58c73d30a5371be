#!/usr/bin/env bash
# Download the pure-Python wheels tools/gpu_check.sh installs on a device machine that lacks them (no network
# there): the CLI's parser stack (jsonargparse[signatures,omegaconf]) and peft, at the versions installed here
# (the ones the tests ran with), into .gpu_wheels/ (git-ignored; a few MB; pass it to the run tool in `carry`).
#
#   bash tools/fetch_gpu_wheels.sh [DIR]     # default DIR: .gpu_wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${1:-.gpu_wheels}
DISTS="jsonargparse omegaconf docstring-parser typeshed-client peft"
mkdir -p "$DIR"
for dist in $DISTS; do
  # the version installed here, else the newest
  version=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$dist")
  rm -f "$DIR"/"${dist//-/_}"-*.whl  # one version of each: two would stop the install there
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DIR" "$dist${version:+==$version}"
done
for whl in "$DIR"/*.whl; do
  case "$whl" in
    *-none-any.whl) ;;
    *) echo "fetch_gpu_wheels: warning: $whl is not a pure-Python wheel; it may not install on the device" >&2 ;;
  esac
done
ls -l "$DIR"
du -sh "$DIR"
