#!/usr/bin/env bash
# How many training processes can share one GPU: seconds per iMAML meta-step at 128 px (cpu
# preset otherwise), one process alone, then 16 at once without and with CUDA MPS.  For a lent
# GPU machine, from the repository root, with .gpudata and .whl as scripts/device_study.sh needs:
#
#     bash bench/gpu_processes.sh OUT_FILE
#
# Each process runs 8 meta-steps; the median over steps 3-8 of every process is printed.
set -u
out=${1:?usage: gpu_processes.sh OUT_FILE}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/monai-*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export IMAML_SEG_DATA=$PWD/.gpudata IMAML_SEG_CACHE=/tmp/imaml-seg-cache
config=/tmp/gpu_processes.toml
sed 's/^resolution = 64/resolution = 128/; s/^val_every = 50/val_every = 1000/' \
    src/imaml_seg/presets/cpu.toml >"$config"
python3 -c "from imaml_seg.data.cache import load_arrays
for n in ('Kvasir-SEG', 'ISIC2018', 'DRIVE'): load_arrays(n, 128, data_root='$IMAML_SEG_DATA', cache_dir=None)"
{
  echo "# bash bench/gpu_processes.sh, $(date -u +%Y-%m-%d), $(nvidia-smi -L | head -1)"
  python3 -c "import torch; print('# torch', torch.__version__)"
} | tee "$out"

measure() {  # measure LABEL PROCESSES
  for i in $(seq "$2"); do
    python3 -m imaml_seg meta-train --config "$config" --algorithm imaml --meta-steps 8 \
      --out "/tmp/gp-$1-$i" -q >"/tmp/gp-$1-$i.log" 2>&1 &
  done
  wait
  python3 -c "import glob, json, statistics
v = [json.loads(l)['seconds'] for f in glob.glob('/tmp/gp-$1-*/log.jsonl') for l in open(f).readlines()[2:]]
print('$1: $2 processes, median s per meta-step', round(statistics.median(v), 3) if v else 'none', f'({len(v)} steps)')" |
    tee -a "$out"
}
measure alone 1
measure shared16 16
nvidia-cuda-mps-control -d && echo "MPS daemon started" | tee -a "$out"
measure mps16 16
