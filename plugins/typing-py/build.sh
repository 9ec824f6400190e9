#!/usr/bin/env bash
# Builds the Python `typing` plugin into a WebAssembly component with componentize-py.
#
#   bash plugins/typing-py/build.sh [OUT_DIR]
#
# Writes OUT_DIR/typing.wasm (default OUT_DIR: <repo>/target/plugins). Needs python3 (3.10+,
# with the venv module) and PyPI; everything it installs goes under <repo>/target/typing-py/,
# nothing into the source tree. A second run reuses the virtualenv.
set -euo pipefail

# The one pinned tool version. 0.25.1 builds components that wasmtime 48 runs.
COMPONENTIZE_PY_VERSION=0.25.1

die() {
    echo "typing-py/build.sh: error: $*" >&2
    exit 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WIT_DIR="$REPO/wit"
WORK="$REPO/target/typing-py"
VENV="$WORK/venv"
STAGE="$WORK/stage"
OUT_DIR="${1:-$REPO/target/plugins}"

[ -f "$HERE/app.py" ] || die "missing $HERE/app.py"
[ -f "$WIT_DIR/iim.wit" ] || die "missing $WIT_DIR/iim.wit"

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.10 or newer"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); Python 3.10 or newer is needed"

CPY="$VENV/bin/componentize-py"
installed_version() {
    # Prints the installed componentize-py version, or nothing.
    [ -x "$CPY" ] && "$CPY" --version 2>/dev/null | awk '{print $2}' || true
}

if [ "$(installed_version)" != "$COMPONENTIZE_PY_VERSION" ]; then
    echo "typing-py: installing componentize-py $COMPONENTIZE_PY_VERSION into $VENV" >&2
    mkdir -p "$WORK"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" \
            || die "could not create a virtualenv with $PYTHON (on Debian: apt-get install python3-venv)"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" \
        || die "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION (is PyPI reachable?)"
    [ "$(installed_version)" = "$COMPONENTIZE_PY_VERSION" ] \
        || die "componentize-py $COMPONENTIZE_PY_VERSION did not install into $VENV"
fi

OUT="$(mkdir -p "$OUT_DIR" && cd "$OUT_DIR" && pwd)/typing.wasm"
STAMP="$WORK/typing.wasm.stamp"

# Skip the build when the inputs (app, WIT, tool version, this script) and the output are the
# ones of the last build.
inputs_hash() {
    "$VENV/bin/python" - "$COMPONENTIZE_PY_VERSION" "$HERE/app.py" "$HERE/build.sh" \
        "$WIT_DIR"/*.wit <<'PY'
import hashlib, sys
h = hashlib.sha256(sys.argv[1].encode())
for path in sys.argv[2:]:
    h.update(path.encode() + b"\0")
    with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
print(h.hexdigest())
PY
}
file_hash() {
    "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}
WANT="$(inputs_hash)"
if [ -f "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT $(file_hash "$OUT")" ]; then
    echo "typing-py: $OUT is up to date" >&2
    exit 0
fi

# componentize-py runs the app once at build time and leaves __pycache__ beside it: build from
# a copy so the source tree stays clean. The `wit_world` bindings are generated on the fly.
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp "$HERE/app.py" "$STAGE/app.py"

TMP_OUT="$OUT.tmp.$$"
trap 'rm -f "$TMP_OUT"' EXIT

# VIRTUAL_ENV points componentize-py's module search at this venv (componentize-py alone),
# not at whatever site-packages the machine's python3 has.
(
    cd "$STAGE"
    VIRTUAL_ENV="$VENV" PYTHONDONTWRITEBYTECODE=1 "$CPY" --quiet \
        -d "$WIT_DIR" -w plugin \
        componentize app -p "$STAGE" -o "$TMP_OUT"
) || die "componentize-py failed to build $HERE/app.py"

mv -f "$TMP_OUT" "$OUT"
echo "$WANT $(file_hash "$OUT")" >"$STAMP"
echo "typing-py: wrote $OUT ($(wc -c <"$OUT") bytes)" >&2
