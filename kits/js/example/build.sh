#!/usr/bin/env bash
# Builds the example plugin `typing` into OUT_DIR/typing.wasm.
#
#   bash kits/js/example/build.sh OUT_DIR
#
# The example is a project as `iim-host plugin new typing --lang js` makes it, with this
# directory's app.js: this script puts one together in the tools directory (the template's
# build.sh, package.json and iim.js with the name filled in, beside this app.js) and runs its
# build.sh, with the tools in $IIM_KIT_TOOLS (default <repo>/target/kits/js) and the WIT of
# <repo>/wit. A second run reuses the tools, and skips the build if nothing changed.
set -euo pipefail

die() {
    echo "kits/js/example/build.sh: error: $*" >&2
    exit 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$(cd "$HERE/../template" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
[ $# -eq 1 ] || die "usage: bash kits/js/example/build.sh OUT_DIR"
OUT_DIR="$1"

export IIM_KIT_TOOLS="${IIM_KIT_TOOLS:-$REPO/target/kits/js}"
export WIT_DIR="$REPO/wit"
PROJECT="$IIM_KIT_TOOLS/example/typing"

rm -rf "$PROJECT"
mkdir -p "$PROJECT"
for file in build.sh package.json iim.js; do
    sed 's/{{name}}/typing/g' "$TEMPLATE/$file" >"$PROJECT/$file"
done
cp "$HERE/app.js" "$PROJECT/"
bash "$PROJECT/build.sh" "$OUT_DIR"
