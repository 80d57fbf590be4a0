# Sourced by tests/clients/generate and tests/clients/example: where things
# are, and the pinned installs both need (each once, cached under
# $EVENTFOLD_TOOLS_DIR, default ~/.cache/eventfold/tools, keyed by the hash
# of its requirements or lock file, so a changed pin installs afresh).

CLIENTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$CLIENTS/../.." && pwd)
TOOLS="${EVENTFOLD_TOOLS_DIR:-$HOME/.cache/eventfold/tools}"
NAMES=(python typescript-grpc typescript-rest)

die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

known_name() {
    local name
    for name in "${NAMES[@]}"; do
        [ "$1" = "$name" ] && return 0
    done
    die "unknown client '$1' (one of: ${NAMES[*]})"
}

# Sets PYTHON: a virtualenv of python/requirements.txt (hashes required,
# wheels only).
python_env() {
    local key dir
    key=$(sha256_of "$CLIENTS/python/requirements.txt" | cut -c1-16)
    dir="$TOOLS/clients-python-$key"
    PYTHON="$dir/bin/python"
    if [ ! -x "$PYTHON" ] || [ ! -f "$dir/.complete" ]; then
        echo "installing the Python client's packages (python/requirements.txt)" >&2
        command -v python3 >/dev/null 2>&1 || die "python3 is needed for the Python client"
        rm -rf "$dir"
        mkdir -p "$TOOLS"
        python3 -m venv "$dir"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
            --only-binary :all: --require-hashes -r "$CLIENTS/python/requirements.txt" \
            || die "pip could not install python/requirements.txt"
        touch "$dir/.complete"
    fi
}

# The site-packages directory of the Python client's virtualenv (it holds
# googleapis-common-protos' google/api and google/rpc .proto files).
python_site() {
    "$PYTHON" -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))'
}

# node_modules of NAME's package-lock.json (npm ci, integrity-checked),
# kept in the cache; NAME/node_modules is a link to it.
node_env() {
    local name=$1 key dir
    command -v npm >/dev/null 2>&1 || die "node and npm (>= 20) are needed for the TypeScript clients"
    key=$(sha256_of "$CLIENTS/$name/package-lock.json" | cut -c1-16)
    dir="$TOOLS/clients-$name-$key"
    if [ ! -f "$dir/.complete" ]; then
        echo "installing the $name client's packages (npm ci of $name/package-lock.json)" >&2
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$CLIENTS/$name/package.json" "$CLIENTS/$name/package-lock.json" "$dir/"
        # --ignore-scripts: no package here needs an install script (buf's
        # binary comes in its platform package).
        (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts >/dev/null) \
            || die "npm ci of $name/package-lock.json failed"
        touch "$dir/.complete"
    fi
    if [ "$(readlink "$CLIENTS/$name/node_modules" 2>/dev/null)" != "$dir/node_modules" ]; then
        rm -rf "$CLIENTS/$name/node_modules"
        ln -s "$dir/node_modules" "$CLIENTS/$name/node_modules"
    fi
}
