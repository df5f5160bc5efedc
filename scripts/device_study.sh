#!/usr/bin/env bash
# The 128 px studies on a lent GPU machine (one GPU, 16 cores), within a fixed time.
#
# Needs, in the repository root: .gpudata/ (scripts/shrink_datasets.py --resolution 128: the
# datasets do not fit the machine's 64 MiB transfer) and .whl/ (a MONAI wheel: the machine has
# PyTorch but no MONAI and no package index).  Writes results/<study>/ as the runner always does,
# then packs them (and transfer's checkpoints, which warm iMAML needs) into OUT; tables and figures are rebuilt where they come back, with
# `imaml-seg experiment experiments/<study>.toml --report-only`.  Usage:
#
#     bash scripts/device_study.sh OUT SECONDS
#
# SKIP="scratch prototype" leaves those methods' chains out (for example where their units came
# back from an earlier machine and the time is better spent on the meta-learners).
#
# with .gpudata, .whl and any runs/<study>/transfer that came back earlier carried along.
#
# Every (study, method) chain runs as its own process on the one GPU: training, the units'
# evaluation, then the _tuned companion's tuning and evaluation.  Chains still running SECONDS
# after the start are stopped; their units are left out of the packed results (the runner
# resumes them on a later run).  A short smoke study of every method runs beside them and stops
# them all if it fails, so that a broken device path costs a minute or two, not the whole lease.
set -u
out=${1:?usage: device_study.sh OUT SECONDS}
seconds=${2:?usage: device_study.sh OUT SECONDS}
start=$(date +%s)
end=$((start + seconds))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/monai-*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export MPLBACKEND=Agg IMAML_SEG_DATA=$PWD/.gpudata IMAML_SEG_CACHE=/tmp/imaml-seg-cache
logs=/tmp/device-logs
mkdir -p "$out" "$logs"
nvidia-smi -L
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" || exit 1

# Many small processes share the GPU: without MPS their contexts take turns (iMAML at 128 px:
# 3.3 s per meta-step with 18 processes); with it, 16 processes each ran as fast as one alone
# (0.84 s per meta-step), measured on an H200 on 2026-11-26.
nvidia-cuda-mps-control -d && echo "MPS daemon started"

# Warm iMAML starts from transfer's weights: a transfer unit scored on an earlier machine whose
# checkpoint did not come along is run again, so that the table scores the weights warm iMAML
# starts from.
for study in unseen_polyp_128 unseen_skin_128 unique_polyp_128; do
  if [ ! -f "results/$study/imaml_warm.json" ] &&
    [ ! -f "runs/$study/transfer/checkpoint.safetensors" ]; then
    rm -f "results/$study/transfer.json" "results/$study/transfer.overlay.npz" \
      "results/${study}_tuned/transfer.json" "results/${study}_tuned/transfer.overlay.npz"
  fi
done

left() {  # seconds to the deadline, at least 1 (timeout 0 would mean no limit)
  local s=$((end - $(date +%s)))
  echo $((s > 1 ? s : 1))
}

mkdir -p /tmp/smoke/experiments
cat >/tmp/smoke/experiments/smoke.toml <<'EOF'
# Every method and code path for a few steps at 128 px.
name = "smoke"
preset = "cpu"
baseline_steps = 2
[overrides.data]
resolution = 128
[overrides.meta]
meta_steps = 2
val_every = 1
val_tasks = 2
checkpoint_every = 1
pretrain_steps = 3
[overrides.eval]
shots = [1]
draws = 1
test_size = 4
inner_steps = 2
[tune]
tasks = 1
stages = [[{}, {inner_steps = 3, optimizer = "adam", inner_lr = 0.001}],
          [{}, {augment_support = true}], [{}, {tta = true}]]
EOF
# Build the caches once, then the smoke study beside the chains: if it fails, stop them all.
python3 -c "from imaml_seg.data.cache import load_arrays
for name in ('Kvasir-SEG', 'CVC-ClinicDB', 'ISIC2018', 'DRIVE'):
    load_arrays(name, 128, data_root='$IMAML_SEG_DATA', cache_dir=None)" || exit 1
echo "caches built $(($(date +%s) - start)) s after the start"
timeout 300 python3 -m imaml_seg experiment /tmp/smoke/experiments/smoke.toml -q \
  >"$logs/smoke.log" 2>&1 &
smoke=$!

chain() {  # chain STUDY METHOD...: the study's units, then its _tuned companion's
  local study=$1
  shift
  local log="$logs/${study}-$1.log"
  {
    echo "start $(date +%s)"
    timeout "$(left)" python3 -m imaml_seg experiment "experiments/$study.toml" --only "$@" -q &&
      timeout "$(left)" python3 -m imaml_seg experiment "experiments/${study}_tuned.toml" \
        --only "$@" -q
    echo "exit $? end $(date +%s)"
  } >"$log" 2>&1
}

for study in unseen_polyp_128 unseen_skin_128; do
  for methods in "transfer imaml_warm" imaml maml fomaml reptile scratch prototype incontext; do
    case " ${SKIP:-} " in *" ${methods%% *} "*) continue ;; esac
    # shellcheck disable=SC2086
    chain $study $methods &
  done
done
chain unique_polyp_128 transfer imaml_warm &
chain unique_polyp_128 imaml &

if wait $smoke; then
  echo "smoke study passed $(($(date +%s) - start)) s after the start"
else
  echo "smoke study FAILED: stopping every chain"
  tail -40 "$logs/smoke.log"
  pkill -f "imaml_seg experiment"
fi
wait
echo "chains ended $(($(date +%s) - start)) s after the start"
for split in unseen_polyp_128 unseen_skin_128 unique_polyp_128; do
  tar czf "$out/$split.tgz" results/"$split"* runs/"$split"/transfer/checkpoint.safetensors \
    2>/dev/null
done
tar czf "$out/logs.tgz" -C / "${logs#/}" 2>/dev/null
tar czf "$out/train_logs.tgz" runs/*_128/*/log.jsonl 2>/dev/null
ls -la "$out"
echo "done $(($(date +%s) - start)) s after the start"
