#!/usr/bin/env bash
# Builds the iim plugin `{{name}}` into a WebAssembly component with componentize-py.
#
#   bash build.sh [OUT_DIR]        writes OUT_DIR/{{name}}.wasm (default: this directory)
#
# The component holds every *.py file beside this script and every package (a directory with
# an __init__.py) there; `app.py` is the plugin, its class `Handler` the exported handler.
#
# Environment:
#   IIM_KIT_TOOLS  where the tools go (default: .tools beside this script)
#   WIT_DIR        the WIT package (default: wit beside this script)
#   PYTHON         the Python that runs componentize-py (default: python3; 3.10 or newer)
#
# It installs the pinned componentize-py from PyPI into a virtualenv in IIM_KIT_TOOLS once,
# and skips the build when the sources, the WIT, this script and the output are those of the
# last build.
set -euo pipefail

NAME="{{name}}"
# The one pinned tool. 0.25.1 builds components that the host's wasmtime runs.
COMPONENTIZE_PY_VERSION=0.25.1

die() {
    echo "$NAME/build.sh: error: $*" >&2
    exit 1
}
say() {
    echo "$NAME/build.sh: $*" >&2
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="${IIM_KIT_TOOLS:-$HERE/.tools}"
WIT_DIR="${WIT_DIR:-$HERE/wit}"
OUT_DIR="${1:-$HERE}"

[ -f "$HERE/app.py" ] || die "missing $HERE/app.py (the plugin: its class Handler)"
[ -d "$WIT_DIR" ] || die "missing the WIT directory $WIT_DIR (set WIT_DIR)"
WIT_DIR="$(cd "$WIT_DIR" && pwd)"
compgen -G "$WIT_DIR/*.wit" >/dev/null || die "no .wit file in $WIT_DIR"
mkdir -p "$TOOLS" || die "cannot create the tools directory $TOOLS"
TOOLS="$(cd "$TOOLS" && pwd)"
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT="$(cd "$OUT_DIR" && pwd)/$NAME.wasm"

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.10 or newer"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); Python 3.10 or newer is needed"

VENV="$TOOLS/venv"
CPY="$VENV/bin/componentize-py"
installed_version() {
    # The installed componentize-py's version, or nothing.
    if [ -x "$CPY" ]; then "$CPY" --version 2>/dev/null | awk '{print $2}'; fi
}
if [ "$(installed_version)" != "$COMPONENTIZE_PY_VERSION" ]; then
    say "installing componentize-py $COMPONENTIZE_PY_VERSION into $VENV"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" \
            || die "cannot create a virtualenv with $PYTHON (on Debian and Ubuntu: apt-get install python3-venv)"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" \
        || die "pip cannot install componentize-py==$COMPONENTIZE_PY_VERSION (is PyPI reachable? a wheel exists for Linux with glibc 2.28+, macOS and Windows, on x86-64 and arm64)"
    [ "$(installed_version)" = "$COMPONENTIZE_PY_VERSION" ] \
        || die "componentize-py $COMPONENTIZE_PY_VERSION did not install into $VENV"
fi

# The sources: top-level modules and packages.
SOURCES=()
for path in "$HERE"/*.py "$HERE"/*/__init__.py; do
    [ -f "$path" ] || continue
    case "$path" in
        */__init__.py) SOURCES+=("$(dirname "$path")") ;;
        *) SOURCES+=("$path") ;;
    esac
done

# Skip the build when the inputs and the output are those of the last build.
STAMP="$TOOLS/$NAME.wasm.stamp"
digest() {
    # One SHA-256 over the tool version and the given files and directories (names and
    # contents, __pycache__ left out); of the output alone with --output.
    "$VENV/bin/python" - "$COMPONENTIZE_PY_VERSION" "$@" <<'PY'
import hashlib, os, sys
h = hashlib.sha256(sys.argv[1].encode())
def add(path):
    h.update(path.encode() + b"\0")
    with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
for path in sys.argv[2:]:
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                add(os.path.join(root, name))
    else:
        add(path)
print(h.hexdigest())
PY
}
WANT="$(digest "$HERE/build.sh" "$WIT_DIR" "${SOURCES[@]}")"
if [ -f "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT $(digest "$OUT")" ]; then
    say "$OUT is up to date"
    exit 0
fi

# componentize-py runs the app once at build time, which leaves __pycache__ directories
# beside the sources: build from a copy so that the project stays clean.
STAGE="$(mktemp -d "$TOOLS/stage.XXXXXX")"
TMP_OUT="$OUT.tmp.$$"
trap 'rm -rf "$STAGE" "$TMP_OUT"' EXIT
cp -R "${SOURCES[@]}" "$STAGE/"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +

# VIRTUAL_ENV points componentize-py's module search at the venv (componentize-py alone), not
# at whatever site-packages the machine's python3 has. The `wit_world` bindings are generated
# from the WIT on the fly. RUST_BACKTRACE=0: with it set, a Python error in the app comes after
# thirty lines of componentize-py's own backtrace.
(
    cd "$STAGE"
    VIRTUAL_ENV="$VENV" PYTHONDONTWRITEBYTECODE=1 RUST_BACKTRACE=0 "$CPY" --quiet \
        -d "$WIT_DIR" -w plugin \
        componentize app -p "$STAGE" -o "$TMP_OUT"
) || die "componentize-py could not build $HERE/app.py (its message is above)"

mv -f "$TMP_OUT" "$OUT"
echo "$WANT $(digest "$OUT")" >"$STAMP"
say "wrote $OUT ($(wc -c <"$OUT") bytes)"
