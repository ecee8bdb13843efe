#!/usr/bin/env bash
# The GPU evidence runs for issue 2, one stage per device call (each self-contained, < 10 min):
#   shapes  - 50k shapes scenes at 64px, VQ, text-conditional next-token, and Token-Shuffle s=2
#   fashion - Fashion-MNIST (from the raw .gz files carried in .gpu/fashion), VQ + class-conditional
#   emoji   - emoji shards carried in data/emoji (made here with `tessera data emoji`), VQ + text-conditional
# Run from the repo root on the GPU machine:  bash launch/h100_issue2.sh STAGE [key=value overrides for training]
# Results (metrics, preview grids, sample grids, logs) are packed into $OUT/STAGE.tar.gz.
set -euo pipefail
stage=$1; shift || true
if command -v nvidia-smi >/dev/null && [ -f .whl/setup.sh ]; then source .whl/setup.sh; fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tessera() { python3 -m tessera.cli "$@"; }
out=${OUT:-out}; mkdir -p "$out" runs
log=$out/$stage.log
train() { /usr/bin/time -f "%e s wall" python3 -m tessera.cli train --config "$@" 2>&1 | tr '\r' '\n' | grep -v "^train .*it/s" ; }
{
case $stage in
  shapes)
    time tessera data shapes --n 50000 --res 64 --out data/shapes64
    train configs/vq_shapes64.yaml "$@"
    train configs/next_token_shapes64.yaml "$@"
    train configs/next_token_shapes64_shuffle2.yaml "$@"
    for run in next_token_shapes64 next_token_shapes64_shuffle2; do
      tessera sample --ckpt runs/$run --prompt "two red circles" --prompt "a blue square" \
        --prompt "a red circle left of a blue square" --prompt "three yellow stars" \
        --n 32 --cfg 3 --top-k 100 --seed 0 --out runs/$run/grid_cfg3.png
    done ;;
  fashion)
    tessera data fashion-mnist --out data/fashion --split train --root .gpu/fashion
    train configs/vq_fashion32.yaml "$@"
    train configs/next_token_fashion32.yaml "$@"
    tessera sample --ckpt runs/next_token_fashion32 --n 40 --cfg 3 --seed 0 --out runs/next_token_fashion32/grid_cfg3.png ;;
  emoji)
    train configs/vq_emoji64.yaml "$@"
    train configs/next_token_emoji64.yaml "$@"
    tessera sample --ckpt runs/next_token_emoji64 --prompt "red apple" --prompt "smiling face with sunglasses" \
      --prompt "dog face" --prompt "pizza" --n 32 --cfg 3 --top-k 200 --seed 0 --out runs/next_token_emoji64/grid_cfg3.png ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
python3 - "$stage" <<'PY'
import json, sys, pathlib
for run in sorted(pathlib.Path("runs").iterdir()):
    m = run / "metrics.json"
    if m.exists():
        print(run.name, json.dumps(json.loads(m.read_text())))
PY
} 2>&1 | tee "$log"
tar czf "$out/$stage.tar.gz" --exclude='*.safetensors' --exclude='train_state.pt' runs "$log"
