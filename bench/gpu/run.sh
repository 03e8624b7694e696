#!/usr/bin/env bash
# One-shot GPU check for a session that has the device machine (see ../shared/gpu/README.md):
#   here:  npm install && npx tsup && ../shared/gpu/pack.sh
#   there: run with carry [".gpu", "dist", "models/micro"] and the prefix pack.sh prints, then
#          bash bench/gpu/run.sh
# Builds the addon against the machine's torch (CUDA), exports the micro model with that torch (checks the
# torch 2.x scripting path), runs the Python parity tests and the ava suite (incl. test/cuda.test.ts), then
# the UNet/canny/native and recipe benchmarks on CUDA. Everything it prints and writes lands in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
export PYTHON=$(command -v python3)
export Torch_DIR=${Torch_DIR:-$($PYTHON -c 'import torch;print(torch.utils.cmake_prefix_path)')/Torch}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

log "build (cmake-js against $Torch_DIR)"
node node_modules/cmake-js/bin/cmake-js compile -j "$(nproc)" --CDCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1; log "build rc=$?"

log "export micro with this torch (2.x scripting path)"
$PYTHON weights/export.py --from models/micro-src --out /tmp/micro-t2 --dtype float16 > "$OUT/export.log" 2>&1; log "export rc=$?"

log "python parity tests (torch 2.x)"
$PYTHON -m unittest discover -s weights/tests -t . > "$OUT/python-tests.log" 2>&1; log "python tests rc=$? ($(tail -1 "$OUT/python-tests.log"))"

log "ava (bundled model exported by torch 1.13)"
node node_modules/ava/entrypoints/cli.mjs > "$OUT/ava.log" 2>&1; log "ava rc=$? ($(grep -E 'tests? (passed|failed)' "$OUT/ava.log" | tail -2 | tr '\n' ' '))"
log "ava on the torch 2.x export (e2e + cuda)"
DF_TEST_WEIGHTS=/tmp/micro-t2 node node_modules/ava/entrypoints/cli.mjs test/e2e.test.ts test/cuda.test.ts > "$OUT/ava-t2.log" 2>&1; log "ava t2 rc=$?"

log "benchmarks on CUDA"
DF_BENCH_DEVICE=cuda BENCH_SIZES=256,512 BENCH_BATCHES=1,4 BENCH_REPS=5 \
  node --import tsx bench/run.ts --only unet,canny,native --out "$OUT/bench-cuda.md" > "$OUT/bench.log" 2>&1; log "bench rc=$?"
log "recipe benchmarks on CUDA (Horse-21 shared vs separate; batchVariants batched vs separate, which 'auto' relies on)"
BENCH_RECIPE_DEVICE=cuda BENCH_RECIPE_DTYPE=float16 BENCH_RECIPE_SIZE=512 BENCH_RECIPE_REPEATS=5 \
  node --import tsx bench/run.ts --only recipe --out "$OUT/bench-cuda-recipe.md" > "$OUT/bench-recipe.log" 2>&1; log "recipe bench rc=$?"
cat "$OUT/summary.txt"
