#!/usr/bin/env bash
# The unseen skin split at 256 px (experiments/unseen_skin_256.toml) on a lent GPU machine, within
# a fixed time: one process per method on the one GPU under CUDA MPS (scripts/device_units.sh).
# Needs, in the repository root, .gpudata256/ (the four datasets at 256 px:
# `scripts/shrink_datasets.py --resolution 256 --quality 90`; exact copies exceed the 64 MiB the
# machine receives) and .whl/ (a MONAI wheel).  The copy (45 MB) and the checkout's results/
# (about 50 MB of finished units) together exceed what the machine receives: move results/ out of
# the checkout for the call and back afterwards (nothing on the machine needs it).  Usage:
#
#     bash scripts/device_256.sh OUT SECONDS [STUDY...]
#
# Each STUDY (default unseen_skin_256) is a 256 px study; each of its methods runs as one process,
# every study's side by side.
# Warm iMAML pretrains transfer's weights and meta-trains from them while a second process scores
# those weights as the transfer unit.  Each method's run folder (checkpoint, config, log) comes
# back as run_<study>_<method>.tgz (one file of them all would pass the 16 MiB a returned file may
# hold), so that a unit stopped at the deadline can be continued and scored elsewhere (the runner
# resumes it).
set -u
out=${1:?usage: device_256.sh OUT SECONDS [STUDY...]}
seconds=${2:?usage: device_256.sh OUT SECONDS [STUDY...]}
shift 2
studies=("${@:-unseen_skin_256}")
chains=()
for s in "${studies[@]}"; do
  [ -f "experiments/$s.toml" ] || { echo "device_256.sh: experiments/$s.toml: no such study" >&2; exit 2; }
  read -ra methods < <(python3 -c "import tomllib, sys
print(*tomllib.load(open(sys.argv[1], 'rb'))['methods'])" "experiments/$s.toml") || exit 2
  for m in "${methods[@]}"; do
    case $m in
    transfer) [[ " ${methods[*]} " == *" imaml_warm "* ]] &&
      chains+=("after:$s:imaml_warm/$s:transfer") || chains+=("$s:transfer") ;;
    *) chains+=("$s:$m") ;;
    esac
  done
done
bash scripts/device_units.sh "$out" "$seconds" .gpudata256 256 "${chains[@]}"
for s in "${studies[@]}"; do
  for run in runs/"$s"/*/; do
    method=$(basename "$run")
    tar czf "$out/run_${s}_$method.tgz" "$run"
  done
done
ls -la "$out"
