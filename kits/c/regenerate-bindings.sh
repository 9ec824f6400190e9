#!/usr/bin/env bash
# Regenerates the C bindings of the world `plugin` of wit/iim.wit, committed so that a C or
# Zig plugin author needs no cargo:
#
#   kits/c/template/bindings/{plugin.c,plugin.h,plugin_component_type.o}
#   (kits/zig/template/bindings is a link to them)
#
# and records the SHA-256 of the WIT they were made from in kits/c/bindings.wit-sha256, which
# the tests compare with wit/iim.wit's (so a WIT change without new bindings fails them).
#
#   bash kits/c/regenerate-bindings.sh           regenerate them
#   bash kits/c/regenerate-bindings.sh --check   only check they are up to date (exit 1 if not)
#
# Run it when wit/iim.wit changes (a new WIT version) or when WIT_BINDGEN_VERSION below is
# raised; commit what it writes. It installs wit-bindgen-cli with cargo into
# $IIM_KIT_TOOLS (default <repo>/target/kits/wit-bindgen): minutes, the first time.
set -euo pipefail

# The workspace's wit-bindgen (Cargo.lock), so that the C and the Rust plugins' bindings
# come from one generator.
WIT_BINDGEN_VERSION=0.61.1

die() {
    echo "regenerate-bindings.sh: error: $*" >&2
    exit 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TOOLS="${IIM_KIT_TOOLS:-$REPO/target/kits/wit-bindgen}"
WIT_BINDGEN="$TOOLS/bin/wit-bindgen"
CHECK=false
case "${1:-}" in
"") ;;
--check) CHECK=true ;;
*) die "usage: $0 [--check]" ;;
esac

if [ "$("$WIT_BINDGEN" --version 2>/dev/null | awk '{print $2}')" != "$WIT_BINDGEN_VERSION" ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found: it installs wit-bindgen-cli"
    echo "regenerate-bindings.sh: installing wit-bindgen-cli $WIT_BINDGEN_VERSION into $TOOLS" >&2
    cargo install --quiet --locked wit-bindgen-cli --version "$WIT_BINDGEN_VERSION" --root "$TOOLS" \
        || die "cargo could not install wit-bindgen-cli $WIT_BINDGEN_VERSION"
fi

GEN="$(mktemp -d)"
trap 'rm -rf "$GEN"' EXIT
out="$("$WIT_BINDGEN" c "$REPO/wit" --world plugin --out-dir "$GEN" 2>&1)" \
    || die "wit-bindgen could not generate the bindings of $REPO/wit: $out"

stale=false
for kit in c; do
    dir="$REPO/kits/$kit/template/bindings"
    for f in plugin.c plugin.h plugin_component_type.o; do
        if ! cmp -s "$GEN/$f" "$dir/$f"; then
            stale=true
            if $CHECK; then
                echo "regenerate-bindings.sh: $dir/$f is not up to date" >&2
            else
                mkdir -p "$dir"
                cp "$GEN/$f" "$dir/$f"
                echo "regenerate-bindings.sh: wrote $dir/$f" >&2
            fi
        fi
    done
done
STAMP="$REPO/kits/c/bindings.wit-sha256"
WANT="$(sha256sum "$REPO/wit/iim.wit" | awk '{print $1}')"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    stale=true
    if $CHECK; then
        echo "regenerate-bindings.sh: $STAMP does not name wit/iim.wit" >&2
    else
        echo "$WANT" >"$STAMP"
        echo "regenerate-bindings.sh: wrote $STAMP" >&2
    fi
fi
if $CHECK && $stale; then
    die "the bindings are not those of $REPO/wit: run bash kits/c/regenerate-bindings.sh"
fi
$stale || echo "regenerate-bindings.sh: the bindings are up to date" >&2
