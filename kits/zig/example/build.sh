#!/usr/bin/env bash
# Builds the example plugin `typing` (typing.zig) with the Zig kit's template build and helper
# library (../template/).
#
#   bash kits/zig/example/build.sh OUT_DIR     writes OUT_DIR/typing.wasm
#
# Tools go to $IIM_KIT_TOOLS (default <repo>/target/kits/zig); see ../template/build.sh for
# what it needs and installs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }

IIM_KIT_TOOLS="${IIM_KIT_TOOLS:-$REPO/target/kits/zig}" \
    WIT_DIR="$REPO/wit" PLUGIN_NAME=typing PLUGIN_ROOT="$HERE/typing.zig" \
    exec bash "$HERE/../template/build.sh" "$1"
