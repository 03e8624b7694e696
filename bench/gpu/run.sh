#!/usr/bin/env bash
# One-shot GPU check for a session that has the device machine (see ../shared/gpu/README.md):
#   here:  npm install && npx tsup && ../shared/gpu/pack.sh
#   there: run with carry [".gpu", "dist"] and the prefix pack.sh prints, then
#          bash bench/gpu/run.sh
# 1. makes the CUDA prebuild against the machine's torch 2.x (`npm run prebuilds -- --cuda`: libtorch found by
#    binding/libtorch.cjs, cmake-js with Torch_DIR, a direct-link retry when find_package(Torch) fails on the
#    CUDA toolkit, strip, RPATH check, child test-load) and copies it to $OUT/prebuilds/linux-x64/ (commit it);
# 2. checks the loader picks it with no DIFFUSION_FEATURES_BINARY (and its cold/warm load times);
# 3. exports the micro model with this torch (the torch 2.x scripting path), runs the Python parity tests,
#    the ava suite (incl. test/cuda.test.ts: CUDA, float16 parity) on the 1.13 and the 2.x exports;
# 4. the UNet/canny/native and recipe benchmarks on CUDA.
# Each step has a time limit so the whole run fits one 10-minute device command. Everything lands in $OUT;
# the table at the end goes to bench/results/ with the machine, date and this command.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
export PYTHON=$(command -v python3)
export DIFFUSION_FEATURES_CACHE_DIR=/tmp/df-cache
export DIFFUSION_FEATURES_JOBS=$(nproc)
unset DIFFUSION_FEATURES_BINARY
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"
date -u +"date %Y-%m-%dT%H:%M:%SZ" | tee -a "$OUT/gpu.txt"

log "CUDA prebuild (node scripts/prebuild.cjs --cuda; Torch_DIR=${Torch_DIR:-unset})"
timeout 300 node scripts/prebuild.cjs --cuda > "$OUT/prebuild.log" 2>&1; rc=$?
log "prebuild rc=$rc ($(grep -E 'prebuild: wrote|retrying|linked directly' "$OUT/prebuild.log" | tr '\n' ' '))"
mkdir -p "$OUT/prebuilds/linux-x64"
for f in prebuilds/linux-x64/diffusion-features.torch-*.cu*.napi.node; do
  [ -e "$f" ] || continue
  cp "$f" "$f.json" "$OUT/prebuilds/linux-x64/"
  log "$(basename "$f"): $(stat -c %s "$f") bytes; RPATH/RUNPATH: $(readelf -d "$f" | grep -E 'RPATH|RUNPATH' | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')none-other"
done

log "loader picks the CUDA prebuild (no DIFFUSION_FEATURES_BINARY): cold, warm"
LOAD='const b = require("./binding/index.cjs"); const t0 = performance.now(); const m = b.load(); const i = b.loadedInfo();
  console.log(JSON.stringify({ ms: Math.round(performance.now() - t0), file: require("path").basename(i.file), kind: i.kind, libtorch: m.libtorchVersion(), cuda: m.cudaAvailable(), devices: m.deviceCount(), info: m.buildInfo() }))'
rm -rf "$DIFFUSION_FEATURES_CACHE_DIR"
node -e "$LOAD" 2>&1 | tee -a "$OUT/summary.txt"
node -e "$LOAD" 2>&1 | tee -a "$OUT/summary.txt"

log "export micro with this torch (2.x scripting path)"
timeout 120 $PYTHON weights/export.py --from models/micro-src --out /tmp/micro-t2 --dtype float16 > "$OUT/export.log" 2>&1; log "export rc=$?"

log "python parity tests (torch 2.x)"
timeout 240 $PYTHON -m unittest discover -s weights/tests -t . > "$OUT/python-tests.log" 2>&1; log "python tests rc=$? ($(tail -1 "$OUT/python-tests.log"))"

log "ava: loader, compat, e2e, cuda (bundled model exported by torch 1.13)"
timeout 300 node node_modules/ava/entrypoints/cli.mjs test/install.test.ts test/compat.test.ts test/native.test.ts test/e2e.test.ts test/cuda.test.ts > "$OUT/ava.log" 2>&1
log "ava rc=$? ($(grep -E 'tests? (passed|failed)|known failure|skipped' "$OUT/ava.log" | tail -3 | tr '\n' ' '))"
log "ava on the torch 2.x export (e2e + cuda)"
DF_TEST_WEIGHTS=/tmp/micro-t2 timeout 200 node node_modules/ava/entrypoints/cli.mjs test/e2e.test.ts test/cuda.test.ts > "$OUT/ava-t2.log" 2>&1
log "ava t2 rc=$? ($(grep -E 'tests? (passed|failed)' "$OUT/ava-t2.log" | tail -2 | tr '\n' ' '))"

left=$(( 570 - ($(date +%s) - START) ))
log "benchmarks on CUDA (${left} s left)"
if [ "$left" -gt 60 ]; then
  DF_BENCH_DEVICE=cuda BENCH_SIZES=256,512 BENCH_BATCHES=1,4 BENCH_REPS=5 \
    timeout $(( left / 2 )) node --import tsx bench/run.ts --only unet,canny,native --out "$OUT/bench-cuda.md" > "$OUT/bench.log" 2>&1; log "bench rc=$?"
  left=$(( 570 - ($(date +%s) - START) ))
  BENCH_RECIPE_DEVICE=cuda BENCH_RECIPE_DTYPE=float16 BENCH_RECIPE_SIZE=512 BENCH_RECIPE_REPEATS=5 \
    timeout $(( left > 30 ? left - 10 : 20 )) node --import tsx bench/run.ts --only recipe --out "$OUT/bench-cuda-recipe.md" > "$OUT/bench-recipe.log" 2>&1; log "recipe bench rc=$?"
fi
cat "$OUT/summary.txt"
