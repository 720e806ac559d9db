#!/usr/bin/env bash
# The first GPU run, in two parts that each fit one device call (bench/session.py holds the plan):
#
#   OUT=/some/dir bash bench/gpu_session.sh 1                              part 1: smoke tests + headline benchmark
#   OUT=/some/dir bash bench/gpu_session.sh 2 --from part1/bench/results.json   part 2: tune the slowest rows
#   bash bench/gpu_session.sh 1 --dry-run                                  the plan and compile estimate (CPU)
#
# Installs the package offline first (or exposes it through a path shim where pip cannot build); all output lands
# in $OUT, one file per step. A Triton cache built on the CPU machine for this one (python -m bench.travel_cache
# build; the device call's carry: [".gpu_cache"]) is installed before part 1's warm-up where its key matches.
set -u
part=${1:?usage: gpu_session.sh 1|2 [--from results.json] [--dry-run]}
shift
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{ nvidia-smi; git rev-parse HEAD 2>/dev/null; } > "$OUT/environment.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
    # No pip build tools there: the package imports from the checkout's root as it is.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
python -m bench.session --part "$part" --out "$OUT" "$@"
