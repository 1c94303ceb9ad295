#!/usr/bin/env bash
# Fetch the prebuilt OHIF v3 viewer and the headless-test tool, into git-ignored folders.
#
#   vendor/ohif/dist/   OHIF's production build from the npm tarball of @ohif/app
#                       (`npm pack` + untar: the tarball already holds dist/, so nothing is
#                       built and nothing of OHIF's dependency tree is installed);
#                       ort/ (onnxruntime, AI tools only) and *.map are dropped: 204 MB -> ~59 MB.
#   vendor/node/        npm playwright-core for tests/interop/test_ohif.py; it drives the
#                       system's Chromium (Debian `chromium`), so no browser is downloaded.
#
# `pacs serve` looks for the dist in PACS_VIEWER_DIST when set, else in vendor/ohif/dist of
# the source checkout it runs from, else in <sys.prefix>/share/pacs/ohif/dist of its
# installation (docs/architecture.md, "Where the viewer files come from"); none of these
# depends on the folder it is started in.
#
# Idempotent: a second run sees the version stamps and returns at once.
# Versions can be changed with OHIF_VERSION / PLAYWRIGHT_VERSION.  Options:
#   --force          fetch again even when present
#   --viewer-only    only the OHIF dist (the Docker build; no test tool)
#   --prefix PREFIX  put the dist in PREFIX/share/pacs/ohif/dist instead of vendor/ohif/dist,
#                    for pacs installed (not editable) into PREFIX, e.g. a virtualenv:
#                    scripts/fetch-ohif.sh --viewer-only --prefix "$(python -c 'import sys; print(sys.prefix)')"
set -euo pipefail

OHIF_DIR=vendor/ohif
prefix=""
force=false
viewer_only=false
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=true ;;
        --viewer-only) viewer_only=true ;;
        --prefix)
            [ $# -ge 2 ] || { echo "fetch-ohif: --prefix needs a folder" >&2; exit 2; }
            prefix="$(mkdir -p "$2" && cd "$2" && pwd)"; shift ;;
        *) echo "usage: $0 [--force] [--viewer-only] [--prefix PREFIX]" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$prefix" ]; then OHIF_DIR="$prefix/share/pacs/ohif"; fi
cd "$(dirname "$0")/.."

OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
# The newest playwright-core that runs on Node.js 18, Debian bookworm's (installed below
# on a machine without Node.js); later releases need Node.js 20.
PLAYWRIGHT_VERSION="${PLAYWRIGHT_VERSION:-1.61.1}"
NODE_DIR=vendor/node

# npm: the one on PATH when it runs; else npm's own tarball from the npm registry, run by
# the machine's Node.js (a NodeSource nodejs whose bundled npm is missing or broken, which
# Debian's npm package conflicts with); with no Node.js at all, Debian's nodejs and npm.
NPM_VERSION="${NPM_VERSION:-10.9.2}"
if ! command -v node >/dev/null 2>&1; then
    echo "fetch-ohif: Node.js not found; installing Debian's nodejs and npm" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    # Without recommends: npm's would pull in a compiler tool chain and desktop packages.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        nodejs npm
fi
if ! npm --version >/dev/null 2>&1; then
    npm_cli="vendor/npm/package/bin/npm-cli.js"
    if [ ! -f "$npm_cli" ]; then
        echo "fetch-ohif: no working npm; fetching npm $NPM_VERSION from the npm registry" >&2
        mkdir -p vendor/npm
        curl -fsSL "https://registry.npmjs.org/npm/-/npm-$NPM_VERSION.tgz" | tar -xz -C vendor/npm
    fi
    npm_cli="$PWD/$npm_cli"
    npm() { node "$npm_cli" "$@"; }
fi

# --- OHIF dist ------------------------------------------------------------------------
stamp="$OHIF_DIR/VERSION"
if ! $force && [ -f "$OHIF_DIR/dist/index.html" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$OHIF_VERSION" ]; then
    echo "fetch-ohif: OHIF $OHIF_VERSION present in $OHIF_DIR/dist"
else
    echo "fetch-ohif: fetching @ohif/app@$OHIF_VERSION (npm pack, ~48 MB)"
    mkdir -p "$OHIF_DIR"
    work="$(mktemp -d "$OHIF_DIR/.fetch-XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    tar -xzf "$work"/ohif-app-*.tgz -C "$work" package/dist
    rm -rf "$work/package/dist/ort"
    find "$work/package/dist" -name '*.map' -delete
    [ -f "$work/package/dist/index.html" ] || { echo "fetch-ohif: no dist/index.html in the tarball" >&2; exit 1; }
    # Swap in the new dist only once it is complete: an interrupted run leaves the old one.
    rm -rf "$OHIF_DIR/dist.old"
    [ -d "$OHIF_DIR/dist" ] && mv "$OHIF_DIR/dist" "$OHIF_DIR/dist.old"
    mv "$work/package/dist" "$OHIF_DIR/dist"
    rm -rf "$OHIF_DIR/dist.old" "$work"
    trap - EXIT
    echo "$OHIF_VERSION" > "$stamp"
    echo "fetch-ohif: OHIF $OHIF_VERSION in $OHIF_DIR/dist ($(du -sh "$OHIF_DIR/dist" | cut -f1))"
fi

# --- playwright-core (test only) ------------------------------------------------------
$viewer_only && exit 0
installed="$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' \
    "$NODE_DIR/node_modules/playwright-core/package.json" 2>/dev/null | head -n1 || true)"
if ! $force && [ "$installed" = "$PLAYWRIGHT_VERSION" ]; then
    echo "fetch-ohif: playwright-core $PLAYWRIGHT_VERSION present in $NODE_DIR"
else
    echo "fetch-ohif: installing playwright-core@$PLAYWRIGHT_VERSION into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    # playwright-core never downloads a browser on install (only `playwright` does).
    npm install --silent --no-audit --no-fund --no-package-lock --prefix "$NODE_DIR" \
        "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
fi
