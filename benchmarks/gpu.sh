#!/usr/bin/env bash
# One GPU session's checks and figures, in under 8 minutes on an H100 (run it once when a GPU is lent):
#   1. the tests of the CUDA branches that no CPU test reaches (tests/test_cuda_paths.py);
#   2. `vitbn bench --device cuda`: fp32 and bf16, eager and compiled, the study's depths, with the CUDA profile;
#   3. a 3-epoch study-config `vitbn train --device cuda` on all of MNIST, with the data on the GPU.
# Everything it prints and writes lands in $OUT (default /tmp/vitbn-gpu): gpu.txt, cuda-tests.log, bench-cuda.json,
# bench-cuda.md, train.log and the run's history.json. Commit the figures to docs/bench/ with the card named.
#
# The GPU machine has PyTorch but no network: MNIST travels with the working tree. Before the run, here:
#   mkdir -p .gpu-data && cp -r ../shared/data/mnist .gpu-data/ && echo /.gpu-data/ >> .git/info/exclude
# and carry .gpu-data. Python packages the machine lacks (mlflow, ax) are not needed: nothing here tracks or tunes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/vitbn-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VITBN_DATA=${VITBN_DATA:-$PWD/.gpu-data}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"

echo "== 1. CUDA paths"
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda_paths.py 2>&1 | tee "$OUT/cuda-tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 2. bench"
timeout 240 $PY -m vitbn bench --device cuda --models vit,vitbnffn,vitbn --depths study,equal --precisions fp32,bf16 \
  --repeats 5 --warmup 3 --no-loader --no-export --no-norms --no-recipes \
  --out "$OUT/bench-cuda.json" --markdown "$OUT/bench-cuda.md" 2>&1 | tail -80
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 3. study-config training, 3 epochs, data on the GPU"
timeout 120 $PY -m vitbn train --device cuda --model vit --depth 6 --epochs 3 --batch-size 100 --lr 5e-4 \
  --no-track --progress lines --out-dir "$OUT/runs" --run-name gpu-study 2>&1 | tee "$OUT/train.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
cp "$OUT/runs/gpu-study/history.json" "$OUT/history.json" 2>/dev/null
$PY - "$OUT/history.json" <<'PY' || status=1
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"epoch {r['epoch']}: train {r['time/train_epoch_s']:.2f} s ({r['throughput/train_img_s']:.0f} img/s), "
          f"test acc {r.get('test/acc', float('nan')):.4f}  (goal: an epoch in under 2 s on an H100)")
PY
rm -rf "$OUT/runs"
exit $status
