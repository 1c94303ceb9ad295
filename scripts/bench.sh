#!/usr/bin/env bash
# Benchmark pacs against Orthanc 1.10 on this machine, side by side, and print the goals.
#
#   scripts/bench.sh                       # phases echo,ingest, 3 repetitions
#   BENCH_PHASES=echo,ingest BENCH_REPS=2 BENCH_TAG=mine scripts/bench.sh
#
# What it does (see docs/benchmarks.md and bench/README.md):
#   1. installs what is missing: Debian packages orthanc, orthanc-dicomweb, dcmtk; the
#      project in .venv (scripts/setup-env.sh) with the harness' Python packages;
#   2. generates the deterministic data set into bench/data when it is not there
#      (~1.7 GB, about 2 minutes on 2 cores);
#   3. runs Orthanc, then `pacs serve`, each from an empty state, with the harness
#      (bench/run_peers.py -> bench/bench.py); results in bench/runs/result-<peer>-<tag>.*;
#   4. prints both tables and the goals table (bench/goals.py), whose exit code it returns
#      (0 only when every measured goal is met).
#
# Settings (environment): BENCH_PHASES (default echo,ingest; phases other than echo and
# ingest run on a second fresh server), BENCH_REPS (3), BENCH_FIND_REPS (10),
# BENCH_TAG (default: date and time), BENCH_PEERS (orthanc,pacs),
# PACS_BIN / BENCH_PYTHON to use an already installed pacs and Python instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

phases="${BENCH_PHASES:-echo,ingest}"
reps="${BENCH_REPS:-3}"
find_reps="${BENCH_FIND_REPS:-10}"
tag="${BENCH_TAG:-$(date +%Y%m%d-%H%M%S)}"
peers="${BENCH_PEERS:-orthanc,pacs}"

# -- 1. packages --------------------------------------------------------------------------
apt_packages=(dcmtk orthanc orthanc-dicomweb)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    # The Debian package's own Orthanc service is not needed (and may be denied by
    # policy-rc.d); the harness starts its own on other ports.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [ -n "${PACS_BIN:-}" ]; then
    python="${BENCH_PYTHON:-python3}"
else
    if [ ! -x .venv/bin/pacs ]; then
        scripts/setup-env.sh
    fi
    python="${BENCH_PYTHON:-.venv/bin/python}"
    export PACS_BIN="$PWD/.venv/bin/pacs"
fi
"$python" -c "import pydicom, pynetdicom, numpy, requests, dicomweb_client" 2>/dev/null ||
    "$python" -m pip install --quiet pydicom pynetdicom numpy requests dicomweb-client

# -- 2. data ------------------------------------------------------------------------------
if [ ! -f bench/data/ingest/ct_par4_r3/manifest.json ] || [ ! -f bench/data/stow/ct_r3/manifest.json ]; then
    echo "[bench] generating bench/data (deterministic, ~1.7 GB)"
    "$python" bench/gen_data.py --preset standard
fi

# -- 3. run -------------------------------------------------------------------------------
round1=() round2=()
IFS=, read -ra wanted <<< "$phases"
for phase in "${wanted[@]}"; do
    case "$phase" in
        echo|ingest) round1+=("$phase") ;;
        *) round2+=("$phase") ;;
    esac
done
args=(--peers "$peers" --reps "$reps" --find-reps "$find_reps" --suffix="-$tag")
if [ ${#round1[@]} -gt 0 ]; then
    args+=(--phases1 "$(IFS=,; echo "${round1[*]}")")
else
    args+=(--only-second)
fi
if [ ${#round2[@]} -gt 0 ]; then
    args+=(--phases2 "$(IFS=,; echo "${round2[*]}")")
else
    args+=(--skip-second)
fi
echo "[bench] $(nproc) CPU, $(uname -r); pacs: $PACS_BIN; phases: $phases; tag: $tag"
"$python" bench/run_peers.py "${args[@]}"

# -- 4. report ----------------------------------------------------------------------------
runs=bench/runs
"$python" bench/report.py "$runs/result-orthanc-$tag.json" "$runs/result-pacs-$tag.json"
echo
only=$(IFS=,; echo "${wanted[*]}")
"$python" bench/goals.py "$runs/result-pacs-$tag.json" "$runs/result-orthanc-$tag.json" --only "$only"
