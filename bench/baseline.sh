#!/usr/bin/env bash
# Builds the baseline of `iim-bench --baseline DIR`: iim-host (and, through its build script, its
# default plugins) at another commit, in a detached git worktree with a target directory of its
# own, so that the bench can run it against the current build in the same run.
#
#   bash bench/baseline.sh [REV] [DIR]
#
# REV defaults to c1dbb36 (where issue 18 started); DIR to target/baseline-REV in the
# workspace. Prints DIR, the path to pass to --baseline, as its last line on stdout; what it
# does goes to stderr. Run again, it reuses the worktree and cargo rebuilds only what changed
# (nothing, for a commit).
set -euo pipefail

fail() {
    echo "baseline.sh: $*" >&2
    exit 1
}

workspace=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rev=${1:-c1dbb36}
dir=${2:-$workspace/target/baseline-$rev}
case $dir in
/*) ;;
*) dir=$PWD/$dir ;;
esac

commit=$(git -C "$workspace" rev-parse --verify --quiet "$rev^{commit}") ||
    fail "no commit $rev in $workspace"

if [[ -e $dir ]]; then
    # Reused only if it is what this script would make: a worktree of REV as committed. A
    # build leaves only ignored files (target/), which `status` does not list.
    here=$(git -C "$dir" rev-parse --show-toplevel 2>/dev/null) ||
        fail "$dir exists and is not a git worktree; remove it or pass another DIR"
    [[ $(cd "$here" && pwd -P) == $(cd "$dir" && pwd -P) ]] ||
        fail "$dir exists and is not a worktree of its own (it is inside $here); pass another DIR"
    at=$(git -C "$dir" rev-parse HEAD)
    [[ $at == "$commit" ]] ||
        fail "$dir is at $at, not $rev ($commit); remove it (git worktree remove --force $dir) or pass another DIR"
    changed=$(git -C "$dir" status --porcelain --untracked-files=no)
    [[ -z $changed ]] ||
        fail "$dir has changes to tracked files, so it is not $rev as committed:"$'\n'"$changed"
    echo "baseline.sh: reusing the worktree $dir at $rev" >&2
else
    # A worktree whose directory was deleted (say, by `cargo clean`) is still registered
    # until pruned, and `worktree add` refuses its path.
    git -C "$workspace" worktree prune
    mkdir -p "$(dirname "$dir")"
    echo "baseline.sh: making a worktree of $rev at $dir" >&2
    git -C "$workspace" worktree add --detach "$dir" "$commit" >&2 ||
        fail "git worktree add failed"
fi

# The worktree's own target directory, whatever CARGO_TARGET_DIR says in this shell: the
# host's build script builds the default plugins into $CARGO_TARGET_DIR/plugins-wasm (or
# target/plugins-wasm), and the bench looks for them in DIR/target.
echo "baseline.sh: building iim-host at $rev in $dir/target (the first time takes minutes)" >&2
(cd "$dir" && CARGO_TARGET_DIR="$dir/target" cargo build --release --locked -p iim-host >&2) ||
    fail "building iim-host at $rev failed (see above)"

host=$dir/target/release/iim-host
chat=$dir/target/plugins-wasm/wasm32-wasip2/release/iim_plugin_chat.wasm
[[ -x $host ]] || fail "the build left no $host"
[[ -f $chat ]] || fail "the build left no $chat"
echo "baseline.sh: ready: $host and $chat" >&2
echo "$dir"
