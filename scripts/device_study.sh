#!/usr/bin/env bash
# The 128 px studies on a lent GPU machine, within a fixed time (scripts/device_units.sh runs
# them: one process per (study, method) chain on the one GPU under CUDA MPS, a deadline, a smoke
# study guarding the lease).  Needs, in the repository root: .gpudata/
# (scripts/shrink_datasets.py --resolution 128) and .whl/ (a MONAI wheel), and any
# runs/<study>/transfer that came back earlier carried along.  Usage:
#
#     bash scripts/device_study.sh OUT SECONDS
#
# Each chain trains and scores a method's units, then its _tuned companion's.  SKIP="scratch
# prototype" leaves those methods' chains out (for example where their units came back from an
# earlier machine and the time is better spent on the meta-learners).  Transfer's checkpoints
# come back in extra.tgz: warm iMAML starts from them.
set -u
out=${1:?usage: device_study.sh OUT SECONDS}
seconds=${2:?usage: device_study.sh OUT SECONDS}

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

chains=()
for study in unseen_polyp_128 unseen_skin_128; do
  for methods in transfer,imaml_warm imaml maml fomaml reptile scratch prototype incontext; do
    case " ${SKIP:-} " in *" ${methods%%,*} "*) continue ;; esac
    chains+=("$study:$methods/${study}_tuned:$methods")
  done
done
chains+=("unique_polyp_128:transfer,imaml_warm/unique_polyp_128_tuned:transfer,imaml_warm")
chains+=("unique_polyp_128:imaml/unique_polyp_128_tuned:imaml")
PACK_EXTRA="runs/*_128/transfer/checkpoint.safetensors" \
  exec bash scripts/device_units.sh "$out" "$seconds" .gpudata 128 "${chains[@]}"
