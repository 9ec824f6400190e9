#!/usr/bin/env bash
# Builds the example plugin `typing` (typing.c) with the C kit's template build and helper
# library (../template/).
#
#   bash kits/c/example/build.sh OUT_DIR     writes OUT_DIR/typing.wasm
#
# Tools go to $IIM_KIT_TOOLS (default <repo>/target/kits/c); see ../template/build.sh for what
# it needs and installs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }

IIM_KIT_TOOLS="${IIM_KIT_TOOLS:-$REPO/target/kits/c}" \
    WIT_DIR="$REPO/wit" PLUGIN_NAME=typing PLUGIN_SOURCES="$HERE/typing.c" \
    exec bash "$HERE/../template/build.sh" "$1"
