#!/usr/bin/env bash
# Builds the example plugin `typing` into OUT_DIR/typing.wasm.
#
#   bash kits/python/example/build.sh OUT_DIR
#
# The example is a project as `iim-host plugin new typing --lang python` makes it, with this
# directory's app.py: this script puts one together in the tools directory (the template's
# build.sh with the name filled in and its iim_plugin.py, beside this app.py) and runs its
# build.sh, with the tools in $IIM_KIT_TOOLS (default <repo>/target/kits/python) and the WIT
# of <repo>/wit. A second run reuses the tools, and skips the build if nothing changed.
set -euo pipefail

die() {
    echo "kits/python/example/build.sh: error: $*" >&2
    exit 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$(cd "$HERE/../template" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
[ $# -eq 1 ] || die "usage: bash kits/python/example/build.sh OUT_DIR"
OUT_DIR="$1"

export IIM_KIT_TOOLS="${IIM_KIT_TOOLS:-$REPO/target/kits/python}"
export WIT_DIR="$REPO/wit"
PROJECT="$IIM_KIT_TOOLS/example/typing"

rm -rf "$PROJECT"
mkdir -p "$PROJECT"
sed 's/{{name}}/typing/g' "$TEMPLATE/build.sh" >"$PROJECT/build.sh"
cp "$TEMPLATE/iim_plugin.py" "$HERE/app.py" "$PROJECT/"
bash "$PROJECT/build.sh" "$OUT_DIR"
