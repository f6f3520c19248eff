#!/usr/bin/env bash
# The checks a session lent a GPU runs there, in one go (5 to 8 minutes on an H200), from the
# repository root, with the machine's own python3 and PyTorch (no Ray or MLflow needed):
#   1. the device and the versions;
#   2. bench/gpu.py on CUDA: ops, host syncs, images/s alone, packed and graphed, Table 4's cost,
#      in the default precision (bf16) and in fp32;
#   3. the CUDA tests (tests/test_cuda.py and the CUDA augmentation test);
#   4. one trial end to end through `python -m fermodel.train` (graphs, bf16, checkpoint);
#   5. the same with torch.compile, which no GPU has run yet.
# Each part has its own time limit, cut to what is left of BUDGET seconds for the whole script
# (default 540; a part with under 20 s left is skipped), and the next runs whatever the last
# did; logs go to $OUT (or /tmp/device_check) as env.txt, gpu.txt, gpu32.txt, tests.txt,
# train.txt and compile.txt. The tests print what a bf16 pack did (pytest -s).
set -u
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
py=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: run it, its output to the terminal and $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    local left=$((${BUDGET:-540} - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "=== $name: skipped, ${left}s of the budget left" | tee "$out/$name.txt"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee "$out/$name.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

part env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; nproc; $py -c 'import sys, torch, torchvision; print(sys.version); \
    print(torch.__version__, torchvision.__version__, torch.version.cuda, \
    torch.backends.cudnn.version(), torch.cuda.get_device_name())'"
part gpu 120 "$py" bench/gpu.py --device cuda --steps 30 --packs 1,2,4,8,16,32,64
part gpu32 120 "$py" bench/gpu.py --device cuda --steps 30 --packs 1,2,4,8,16,32,64 \
    --precision fp32
part tests 120 "$py" -m pytest -q -s -p no:cacheprovider -o addopts="" -ra --durations=10 \
    tests/test_cuda.py "tests/test_augment.py::test_the_same_ops_run_on_a_cuda_batch"
trial() {  # trial NAME SECONDS EPOCHS [FLAGS...]: the paper's trial on the synthetic set
    local name=$1 limit=$2 epochs=$3
    shift 3
    rm -rf "/tmp/$name"
    part "$name" "$limit" "$py" -m fermodel.train --device cuda --epochs $epochs --quiet \
        --synthetic-subjects 40 --synthetic-images-per-class 12 --out "/tmp/$name" "$@"
    [[ -f /tmp/$name/results.json ]] || return
    $py -c "import json; r = json.load(open('/tmp/$name/results.json')); \
        print('notes:', r.get('notes')); \
        print('epochs (s, images/s):', [(round(h['epoch_seconds'], 2), \
              round(h['images_per_second'])) for h in r['history']])" \
        2>&1 | tee -a "$out/$name.txt"
}
trial train 60 4
trial compile 240 2 --compile
