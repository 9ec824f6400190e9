#!/usr/bin/env bash
# Builds the iim plugin `{{name}}` into a WebAssembly component: TypeScript compiled by tsc,
# then componentize-js.
#
#   bash build.sh [OUT_DIR]        writes OUT_DIR/{{name}}.wasm (default: this directory)
#   npm run build [-- OUT_DIR]     the same
#
# `app.ts` is the plugin: a module exporting `handler` ({init, handle}); it may import other
# modules of this directory by relative path, written with .js ('./iim.js'). The steps:
#   1. jco guest-types: the types of the WIT's interfaces ('iim:plugin/iim@0.1.2', ...) into
#      .types/ (tsconfig.json includes them);
#   2. tsc -p tsconfig.json: type-checks and writes dist/*.js;
#   3. componentize-js dist/app.js: the component.
#
# Environment:
#   IIM_KIT_TOOLS  where the tools go (default: .tools beside this script)
#   WIT_DIR        the WIT package (default: wit beside this script)
#
# It installs the devDependencies of package.json (exact versions) with npm into
# IIM_KIT_TOOLS once, not into this directory, and skips the build when the sources, the WIT,
# package.json, this script and the output are those of the last build.
set -euo pipefail

NAME="{{name}}"
# Node.js 20.19 or newer: what the pinned tools' dependencies ask for.
NODE_MAJOR_MIN=20
NODE_MINOR_MIN=19

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

[ -f "$HERE/app.ts" ] || die "missing $HERE/app.ts (the plugin: it exports handler)"
[ -f "$HERE/tsconfig.json" ] || die "missing $HERE/tsconfig.json"
[ -f "$HERE/package.json" ] || die "missing $HERE/package.json (it pins the tools)"
[ -d "$WIT_DIR" ] || die "missing the WIT directory $WIT_DIR (set WIT_DIR)"
WIT_DIR="$(cd "$WIT_DIR" && pwd)"
compgen -G "$WIT_DIR/*.wit" >/dev/null || die "no .wit file in $WIT_DIR"
NODE_MIN="$NODE_MAJOR_MIN.$NODE_MINOR_MIN"
command -v node >/dev/null 2>&1 \
    || die "node not found: install Node.js $NODE_MIN or newer, with npm"
command -v npm >/dev/null 2>&1 \
    || die "npm not found: install it beside Node.js (on Debian: apt-get install npm)"
node -e "const [a, b] = process.versions.node.split('.').map(Number);
process.exit(a > $NODE_MAJOR_MIN || (a === $NODE_MAJOR_MIN && b >= $NODE_MINOR_MIN) ? 0 : 1)" \
    || die "node is $(node --version); Node.js $NODE_MIN or newer is needed"
mkdir -p "$TOOLS" || die "cannot create the tools directory $TOOLS"
TOOLS="$(cd "$TOOLS" && pwd)"
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT="$(cd "$OUT_DIR" && pwd)/$NAME.wasm"

# The tools' own package.json: the pins (devDependencies, overrides) of this one. Installed
# when it differs from the one installed last, or a pinned package is not at its version.
TOOLS_JSON="$(node -e "const p = require(process.argv[1]);
console.log(JSON.stringify({ name: 'iim-kit-ts-tools', private: true,
  devDependencies: p.devDependencies || {}, overrides: p.overrides || {} }, null, 2));" \
    "$HERE/package.json")" || die "cannot read $HERE/package.json"
installed() {
    [ -f "$TOOLS/package.json" ] && [ "$(cat "$TOOLS/package.json")" = "$TOOLS_JSON" ] \
        && node -e "const p = require(process.argv[1] + '/package.json');
for (const [name, version] of Object.entries(p.devDependencies)) {
  let got;
  try {
    got = require(process.argv[1] + '/node_modules/' + name + '/package.json').version;
  } catch {}
  if (got !== version) process.exit(1);
}" "$TOOLS"
}
if ! installed; then
    say "installing the tools pinned in package.json into $TOOLS (about 380 MB)"
    printf '%s\n' "$TOOLS_JSON" >"$TOOLS/package.json"
    (cd "$TOOLS" && npm install --no-audit --no-fund --loglevel=error) \
        || die "npm cannot install the tools into $TOOLS (is the npm registry reachable?)"
    installed || die "the tools installed into $TOOLS are not the versions package.json pins"
fi
COMPONENTIZE_JS="$TOOLS/node_modules/.bin/componentize-js"
JCO="$TOOLS/node_modules/.bin/jco"
TSC="$TOOLS/node_modules/.bin/tsc"

# The sources: every .ts file of this directory and its subdirectories but the tools' and the
# generated ones.
SOURCES=()
while IFS= read -r -d '' path; do
    SOURCES+=("$path")
done < <(find "$HERE" -mindepth 1 \
    \( -name node_modules -o -name dist -o -name '.*' -o -name wit \) -prune -o \
    -name '*.ts' -type f -print0 | sort -z)

# Skip the build when the inputs and the output are those of the last build.
STAMP="$TOOLS/$NAME.wasm.stamp"
digest() {
    # One SHA-256 over the given files (names and contents).
    node -e "const { createHash } = require('node:crypto'); const fs = require('node:fs');
const h = createHash('sha256');
for (const path of process.argv.slice(1)) {
  h.update(path + '\0');
  h.update(createHash('sha256').update(fs.readFileSync(path)).digest());
}
console.log(h.digest('hex'));" "$@"
}
WANT="$(digest "$HERE/build.sh" "$HERE/package.json" "$HERE/tsconfig.json" "$WIT_DIR"/*.wit \
    "${SOURCES[@]}")"
if [ -f "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT $(digest "$OUT")" ]; then
    say "$OUT is up to date"
    exit 0
fi

# 1. The types of the WIT, for tsc (and an editor).
rm -rf "$HERE/.types"
"$JCO" guest-types "$WIT_DIR" --world-name plugin --out-dir "$HERE/.types" --quiet \
    || die "jco could not generate the types of $WIT_DIR (its message is above)"
# 2. Type-check and compile to dist/.
rm -rf "$HERE/dist"
"$TSC" -p "$HERE/tsconfig.json" || die "tsc found errors (above)"
[ -f "$HERE/dist/app.js" ] || die "tsc wrote no dist/app.js (is outDir dist in tsconfig.json?)"

TMP_OUT="$OUT.tmp.$$"
trap 'rm -f "$TMP_OUT"' EXIT
# 3. Run from dist/: the component sees it as `/`, so that app.js finds its imports.
# --disable: no fetch() and no wasi:http (the host offers neither); console (stdio), random
# numbers and clocks stay, through the WASI 0.2 the host provides.
(
    cd "$HERE/dist"
    "$COMPONENTIZE_JS" app.js --wit "$WIT_DIR" --world-name plugin \
        --disable http fetch-event --out "$TMP_OUT"
) || die "componentize-js could not build $HERE/dist/app.js (its message is above)"
[ -s "$TMP_OUT" ] || die "componentize-js wrote no component"

mv -f "$TMP_OUT" "$OUT"
echo "$WANT $(digest "$OUT")" >"$STAMP"
say "wrote $OUT ($(wc -c <"$OUT") bytes)"
