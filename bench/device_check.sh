#!/usr/bin/env bash
# The checks a session lent a GPU runs there, in one go, from the repository root, with the
# machine's own python3 and PyTorch (no Ray or MLflow needed). Give the device tool a timeout
# of 540 s: the script ends by BUDGET seconds (default 480), leaving a minute for the transfer.
#   1. the device and the versions;
#   2. bench/gpu.py on CUDA, each figure printed as it is measured (ops, host syncs, images/s
#      and memory per member, Table 4's GPU-hours after every pack size), packs growing until
#      the first out-of-memory: bf16 fused (K = 1 to 32), fp32 with TF32 fused, bf16 by vmap;
#   3. the CUDA tests (tests/test_cuda.py and the CUDA augmentation test);
#   4. one trial end to end through `python -m fermodel.train` (graphs, bf16, checkpoint).
# Each part has its own time limit, cut to what is left of the budget (a part with under
# MIN_PART seconds left, default 20, is skipped), and the next runs whatever the last did; every part's output goes to the
# terminal and to $OUT (or /tmp/device_check) as env.txt, gpu.txt, gpu32.txt, gpuvmap.txt,
# tests.txt and train.txt. DEVICE (default cuda), PYTHON (default python3) and MIN_PART are for
# the script's own test, which runs it on the CPU with a stand-in python.
set -u
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
budget=${BUDGET:-480}
min_part=${MIN_PART:-20}

part() {  # part NAME SECONDS COMMAND...: run it, its output to the terminal and $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS - 3))
    ((limit > left)) && limit=$left
    if ((limit < min_part)); then
        echo "=== $name: skipped, ${left}s of the budget left" | tee "$out/$name.txt"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee "$out/$name.txt"
    local start=$SECONDS
    timeout -k 2 "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

part env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; nproc; $py -c 'import sys, torch, torchvision; print(sys.version); \
    print(torch.__version__, torchvision.__version__, torch.version.cuda, \
    torch.backends.cudnn.version(), torch.cuda.is_available() and torch.cuda.get_device_name())'"
part gpu 120 "$py" bench/gpu.py --device "$device" --steps 20 --packs 1,2,4,8,16,32
part gpu32 80 "$py" bench/gpu.py --device "$device" --steps 20 --packs 1,4,16 --precision fp32
part gpuvmap 60 "$py" bench/gpu.py --device "$device" --steps 20 --packs 1,4,16 --vmap
part tests 130 "$py" -m pytest -q -s -p no:cacheprovider -o addopts="" -ra --durations=10 \
    tests/test_cuda.py "tests/test_augment.py::test_the_same_ops_run_on_a_cuda_batch"
rm -rf /tmp/device_check_train
part train 60 "$py" -m fermodel.train --device "$device" --epochs 4 --quiet \
    --synthetic-subjects 40 --synthetic-images-per-class 12 --out /tmp/device_check_train
if [[ -f /tmp/device_check_train/results.json ]]; then
    $py -c "import json; r = json.load(open('/tmp/device_check_train/results.json')); \
        print('notes:', r.get('notes')); \
        print('epochs (s, images/s):', [(round(h['epoch_seconds'], 2), \
              round(h['images_per_second'])) for h in r['history']])" \
        2>&1 | tee -a "$out/train.txt"
fi
echo "=== device check done in $SECONDS s (budget $budget s)"
