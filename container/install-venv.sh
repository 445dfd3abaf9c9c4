#!/bin/sh
# Builds /opt/venv inside the image build, in two steps so that a code change reuses the
# dependency layer:
#   install-venv deps requirements/cuda.txt    # exactly the lock, hashes required
#   install-venv project                       # the project on top (/src), then pip check
# Exactly the lock (--no-deps: nothing is resolved at build time, so nothing can move torch), from
# /wheelhouse when it holds wheels (air-gapped builds; this machine's builds reach no index),
# otherwise from the indexes. `pip check` fails the build if the lock is not complete and consistent.
set -eu
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
src=""
if ls /wheelhouse/*.whl >/dev/null 2>&1; then src="--no-index --find-links /wheelhouse"; fi
case $1 in
  deps)
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install -q $src --no-deps --require-hashes -r "$2" ;;
  project)
    /opt/venv/bin/pip install -q $src --no-deps /src   # its build backend (setuptools) from the same source
    /opt/venv/bin/pip check ;;  # files are world-readable as pip writes them: any uid (OpenShift's too) reads the venv
  *) echo "usage: install-venv deps LOCK | project" >&2; exit 2 ;;
esac
