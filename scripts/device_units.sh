#!/usr/bin/env bash
# Study units on a lent GPU machine (one GPU, 16 cores), side by side, within a fixed time.
#
#     bash scripts/device_units.sh OUT SECONDS DATA RESOLUTION CHAIN...
#
# DATA is a datasets folder inside the repository (scripts/shrink_datasets.py's copy at
# RESOLUTION: the datasets do not fit the machine's 64 MiB transfer); .whl/ holds a MONAI wheel
# (the machine has PyTorch but no MONAI and no package index).  A CHAIN is one process:
# STUDY:METHOD[,METHOD...] segments joined by '/', run one after another, e.g.
# "unseen_skin_seed1:transfer,imaml_warm" or "unseen_polyp_128:imaml/unseen_polyp_128_tuned:imaml".
# A segment "after:STUDY:METHOD" waits until another chain has begun runs/STUDY/METHOD: with
# "S:imaml_warm" beside "after:S:imaml_warm/S:transfer", warm iMAML meta-trains while transfer's
# weights (pretrained by the first chain) are scored by the second.
# The runner writes results/<study>/ as it always does; OUT receives results.tgz (every named
# study's results), logs.tgz (this script's logs), train_logs.tgz (runs/<study>/*/log.jsonl) and,
# with PACK_EXTRA="PATH...", extra.tgz.  Tables and figures are rebuilt where they come back, with
# `imaml-seg experiment experiments/<study>.toml --report-only`.
#
# Chains still running SECONDS after the start are stopped; a unit writes its results only when
# it finishes, so a stopped one is simply absent (the runner resumes it on a later run).  A short
# smoke study of every method runs beside the chains and stops them all if it fails, so that a
# broken device path costs a minute or two, not the whole lease.
#
# Many small processes share the GPU: without MPS their contexts take turns (iMAML at 128 px:
# 3.3 s per meta-step with 18 processes); with it, 16 processes each ran as fast as one alone
# (0.84 s per meta-step), measured on an H200 on 2026-11-26 (bench/results/gpu_processes_h200.txt).
set -u
out=${1:?usage: device_units.sh OUT SECONDS DATA RESOLUTION CHAIN...}
seconds=${2:?usage: device_units.sh OUT SECONDS DATA RESOLUTION CHAIN...}
data=${3:?usage: device_units.sh OUT SECONDS DATA RESOLUTION CHAIN...}
resolution=${4:?usage: device_units.sh OUT SECONDS DATA RESOLUTION CHAIN...}
shift 4
[ $# -gt 0 ] || { echo "device_units.sh: no CHAIN given" >&2; exit 2; }
[ -d "$data" ] || { echo "device_units.sh: $data: no datasets folder (carry it)" >&2; exit 2; }
compgen -G ".whl/monai-*.whl" >/dev/null ||
  { echo "device_units.sh: .whl/monai-*.whl: no MONAI wheel (carry .whl)" >&2; exit 2; }
start=$(date +%s)
end=$((start + seconds))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/monai-*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export MPLBACKEND=Agg IMAML_SEG_DATA=$PWD/$data IMAML_SEG_CACHE=/tmp/imaml-seg-cache
logs=/tmp/device-logs
rm -rf "$logs" /tmp/smoke # from an earlier call on this machine
mkdir -p "$out" "$logs"
nvidia-smi -L
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" || exit 1
nvidia-cuda-mps-control -d && echo "MPS daemon started"

left() { # seconds to the deadline, at least 1 (timeout 0 would mean no limit)
  local s=$((end - $(date +%s)))
  echo $((s > 1 ? s : 1))
}

mkdir -p /tmp/smoke/experiments
cat >/tmp/smoke/experiments/smoke.toml <<EOF
# Every method and code path for a few steps.
name = "smoke"
preset = "cpu"
baseline_steps = 2
[overrides.data]
resolution = $resolution
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
    load_arrays(name, $resolution, data_root='$IMAML_SEG_DATA', cache_dir=None)" || exit 1
echo "caches built $(($(date +%s) - start)) s after the start"
timeout 300 python3 -m imaml_seg experiment /tmp/smoke/experiments/smoke.toml -q \
  >"$logs/smoke.log" 2>&1 &
smoke=$!

chain() { # chain SEGMENT/SEGMENT...: each STUDY:METHOD,... in turn, stopping at the first failure
  local log="$logs/${1//[\/:,]/-}.log" rc=0 segment segments methods
  IFS=/ read -ra segments <<<"$1"
  {
    echo "start $(date +%s)"
    for segment in "${segments[@]}"; do
      if [[ $segment == after:* ]]; then # wait for another chain to begin runs/STUDY/METHOD
        segment=${segment#after:}
        while [ ! -d "runs/${segment%%:*}/${segment#*:}" ] && [ "$(left)" -gt 1 ]; do sleep 2; done
        echo "runs/${segment%%:*}/${segment#*:} begun $(date +%s)"
        continue
      fi
      IFS=, read -ra methods <<<"${segment#*:}"
      timeout "$(left)" python3 -m imaml_seg experiment "experiments/${segment%%:*}.toml" \
        --only "${methods[@]}" -q || { rc=$?; break; }
    done
    echo "exit $rc end $(date +%s)"
  } >"$log" 2>&1
}

studies=()
for spec in "$@"; do
  chain "$spec" &
  IFS=/ read -ra segments <<<"$spec"
  for segment in "${segments[@]}"; do [[ $segment == after:* ]] || studies+=("${segment%%:*}"); done
done

if wait $smoke; then
  echo "smoke study passed $(($(date +%s) - start)) s after the start"
else
  echo "smoke study FAILED: stopping every chain"
  tail -40 "$logs/smoke.log"
  pkill -f "imaml_seg experiment"
fi
wait
echo "chains ended $(($(date +%s) - start)) s after the start"
mapfile -t studies < <(printf '%s\n' "${studies[@]}" | sort -u)
paths=()
for study in "${studies[@]}"; do
  for p in "results/$study" "results/$study.json"; do [ -e "$p" ] && paths+=("$p"); done
done
tar czf "$out/results.tgz" "${paths[@]}"
tar czf "$out/logs.tgz" -C / "${logs#/}"
(shopt -s nullglob; logs_=(); for study in "${studies[@]}"; do logs_+=(runs/"$study"/*/log.jsonl); done
  [ ${#logs_[@]} -gt 0 ] && tar czf "$out/train_logs.tgz" "${logs_[@]}")
# shellcheck disable=SC2086
[ -n "${PACK_EXTRA:-}" ] && tar czf "$out/extra.tgz" ${PACK_EXTRA} 2>/dev/null
tail -n 3 "$logs"/*.log
ls -la "$out"
echo "done $(($(date +%s) - start)) s after the start"
