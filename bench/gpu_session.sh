#!/usr/bin/env bash
# One GPU session in one go (e.g. one `device` call): install the package offline, run the test suite compiled on
# the GPU (bf16, larger shapes, 50x determinism), the numerics check, then a bench subset; everything lands in $OUT.
#
#   OUT=/some/dir bash bench/gpu_session.sh [bench args...]     (default bench args: the D=64/128 headline rows)
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; \
  git rev-parse HEAD 2>/dev/null; } > "$OUT/environment.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
    # No pip build tools there: expose the package with kernels/ mapped to fused_attn.kernels, as setup.py does.
    shim=$(mktemp -d); mkdir "$shim/fused_attn"
    for f in fused_attn/*; do ln -s "$PWD/$f" "$shim/fused_attn/"; done
    ln -s "$PWD/kernels" "$shim/fused_attn/kernels"
    export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
python -m pytest tests -q -x --durations=15 > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
python -m fused_attn check --full --save-baseline "$OUT/check_baseline.json" > "$OUT/check.txt" 2>&1
echo "check rc=$?" >> "$OUT/check.txt"
if [ $# -eq 0 ]; then
    set -- --seqlens 1024 4096 16384 --head-dims 64 128 --masks none causal window1024 --gqa-ratio 1
fi
python -m bench --out "$OUT/bench" "$@" > "$OUT/bench.txt" 2>&1; echo "bench rc=$?" >> "$OUT/bench.txt"
python -m bench --varlen --head-dims 64 128 --masks none causal --modes fwd fwd+bwd --out "$OUT/bench" \
    > "$OUT/bench_varlen.txt" 2>&1; echo "bench --varlen rc=$?" >> "$OUT/bench_varlen.txt"
python -m bench --decode --out "$OUT/bench" > "$OUT/bench_decode.txt" 2>&1; echo "bench --decode rc=$?" >> "$OUT/bench_decode.txt"
python -m bench --flex --out "$OUT/bench" > "$OUT/bench_flex.txt" 2>&1; echo "bench --flex rc=$?" >> "$OUT/bench_flex.txt"
python -m bench --serving --seqlens 4096 32768 --out "$OUT/bench" > "$OUT/bench_serving.txt" 2>&1
echo "bench --serving rc=$?" >> "$OUT/bench_serving.txt"
tail -n 3 "$OUT/pytest.txt" "$OUT/check.txt" "$OUT/bench.txt" "$OUT/bench_varlen.txt" "$OUT/bench_decode.txt" \
    "$OUT/bench_flex.txt" "$OUT/bench_serving.txt"
