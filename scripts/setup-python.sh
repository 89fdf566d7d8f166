#!/usr/bin/env bash
# Create .venv/ at the repository root with the official gguf-py package, pinned, so the
# cross-check in tests/gguf_py.rs has a second GGUF implementation to compare against.
# Idempotent: quiet and fast when the venv already holds the pinned versions.
set -euo pipefail

GGUF_VERSION=0.19.0
NUMPY_VERSION=2.4.6

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"

installed() {
    "$py" - "$GGUF_VERSION" "$NUMPY_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("gguf"), version("numpy")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}

if [ -x "$py" ] && installed; then
    exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "setup-python.sh: $python not found" >&2; exit 1; }
[ -x "$py" ] || "$python" -m venv "$venv"
"$py" -m pip install --quiet --disable-pip-version-check \
    "gguf==$GGUF_VERSION" "numpy==$NUMPY_VERSION"
installed || { echo "setup-python.sh: gguf $GGUF_VERSION not importable in $venv" >&2; exit 1; }
echo "setup-python.sh: gguf $GGUF_VERSION and numpy $NUMPY_VERSION installed in $venv"
