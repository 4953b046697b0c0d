#!/usr/bin/env bash
# Install horovod (PyTorch + Gloo + MPI) into a Python that already has torch, building the
# wheel from the PyPI sdist once and caching it outside the repository.
#
#   scripts/install-horovod.sh [PYTHON]        (default: .venv/bin/python)
#
# Why a build at all: horovod 0.28.1's sdist asks CMake for C++14, and torch >= 2.1 headers
# need C++17, so the stock build fails. We patch that one line in its two CMake files, build
# with --no-build-isolation (so it compiles against the torch in this environment) and keep
# the wheel in $HOROVOD_WHEEL_CACHE, keyed by the horovod, torch, Python and platform
# versions; a second set-up then takes seconds. Open MPI comes from Debian (see Makefile).
# docker/ runs this same script.
set -euo pipefail

PY=${1:-.venv/bin/python}
VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HOROVOD_WHEEL_CACHE:-/var/cache/commhooks/wheels}

key=$("$PY" - <<'EOF'
import platform, sys, torch
print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")
EOF
)
dir="$CACHE/horovod-$VERSION-$key"

have=$("$PY" -c 'import horovod.torch, horovod; print(horovod.__version__)' 2>/dev/null || true)
if [ "$have" = "$VERSION" ]; then
  echo "install-horovod: horovod $VERSION already installed"
  exit 0
fi

if ! ls "$dir"/horovod-*.whl >/dev/null 2>&1; then
  echo "install-horovod: building horovod $VERSION for $key (about 10 minutes on 2 cores)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
  tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
  src="$work/horovod-$VERSION"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  done
  "$PY" -m pip install --quiet setuptools wheel
  mkdir -p "$CACHE"
  rm -rf "$dir.partial"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$dir.partial" "$src"
  mv "$dir.partial" "$dir"
fi

"$PY" -m pip install --quiet "$dir"/horovod-*.whl
"$PY" -c 'import horovod.torch' && echo "install-horovod: installed $(ls "$dir")"
