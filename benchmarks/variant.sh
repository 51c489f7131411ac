# Sourced by the GPU A/B scripts: a copy of this checkout's src with whole lines of one file changed.
#
#   dir=$(variant FILE "OLD=>NEW" ["OLD=>NEW" ...])   FILE under src/lowgear; OLD a sed regex for the whole line
#
# prints the copy's src folder; stops (status 1, a line on stderr) where FILE has no line OLD, so an A/B never
# times a tree that is not the one it names. Run from the repository root.
variant() {
    local file="$1" dir change; shift
    dir=$(mktemp -d); cp -r src "$dir/src"
    for change in "$@"; do
        sed -i "s/^${change%%=>*}\$/${change##*=>}/" "$dir/src/lowgear/$file"
        grep -q "^${change##*=>}\$" "$dir/src/lowgear/$file" || { echo "src/lowgear/$file has no line '${change%%=>*}'" >&2; return 1; }
    done
    echo "$dir/src"
}
