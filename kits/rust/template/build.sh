#!/usr/bin/env bash
# Builds the {{name}} plugin into a WebAssembly component: OUT_DIR/{{name}}.wasm (default: .).
#
#   ./build.sh [OUT_DIR]
#
# Needs Rust (rustup) with the wasm32-wasip2 target, which it adds if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OUT_DIR="${1:-.}"
command -v cargo >/dev/null 2>&1 || { echo "build.sh: error: cargo not found; install Rust with rustup" >&2; exit 1; }
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "build.sh: adding the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi
cargo build --release --target wasm32-wasip2
mkdir -p "$OUT_DIR"
cp target/wasm32-wasip2/release/{{crate}}.wasm "$OUT_DIR/.{{name}}.wasm.tmp"
mv "$OUT_DIR/.{{name}}.wasm.tmp" "$OUT_DIR/{{name}}.wasm"
echo "build.sh: wrote $OUT_DIR/{{name}}.wasm ($(wc -c <"$OUT_DIR/{{name}}.wasm") bytes)" >&2
