#!/usr/bin/env bash
# The GPU check: everything measured on a GPU, in one call of at most 8 minutes, on a bare CUDA machine.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine, in the repository
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh     # a dry run of the script on a CPU, tiny sizes
#
# It installs what the machine lacks from .whl/ (benchmarks/gpu_wheels.sh fills it where PyPI is
# reachable), or else `pip install -e .` from the index; runs the gpu-marked tests, then method.py and
# generator.py at 256 and 1024 px (FFHQ channels) in fp32, bf16 autocast, channels_last and torch.compile,
# stylegan2-ada-pytorch's own CUDA ops when its source is there, and pipeline.py where ffmpeg and Prefect
# are. Each part has its own time limit and none runs past the budget: a part that times out or fails is
# recorded as such and the next one runs; those left when time runs out are recorded as skipped. All of it,
# each part's figures, status, seconds and log, goes into one JSON.
#
# Environment: GPU_CHECK_DEVICE (cuda), GPU_CHECK_SECONDS (the budget, 470), GPU_CHECK_SIZES ("256 1024"),
# GPU_CHECK_STEPS (stitching steps, 20), GPU_CHECK_OPTIONS ("fp32 bf16 channels-last compile"), GPU_CHECK_SKIP
# (parts to leave out, by the start of their names: "pipeline generator"),
# GPU_CHECK_OUT (default $OUT/gpu-check.json when OUT is set, else benchmarks/results/gpu-check.json),
# PYTHON (python3), STITCHTIME_REFERENCE (stylegan2-ada-pytorch's source; default .whl/stylegan2-ada-pytorch
# when there).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
RESULT=${GPU_CHECK_OUT:-${OUT:+$OUT/gpu-check.json}}
RESULT=${RESULT:-benchmarks/results/gpu-check.json}
WORK=$(mktemp -d)
PARTS=$WORK/parts.tsv
touch "$PARTS"

# part NAME LIMIT COMMAND...: COMMAND for at most LIMIT seconds, never past the budget (15 s are kept for the
# report); its output goes to $WORK/NAME.log and the benchmarks write their JSON to $WORK/NAME.json.
part() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    local left=$((DEADLINE - SECONDS - 15)) skipped
    for skipped in ${GPU_CHECK_SKIP:-}; do
        if [[ $name == "$skipped"* ]]; then
            skip "$name" "GPU_CHECK_SKIP"
            return
        fi
    done
    if ((left < 20)); then
        skip "$name" "out of time"
        return
    fi
    ((limit > left)) && limit=$left
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local code=$?
    case $code in
        0) status=ok ;;
        124 | 137) status="timed out after $limit s" ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$code" "$*" >>"$PARTS"
    echo "$name: $status ($((SECONDS - start)) s)"
}
skip() {
    printf '%s\tskipped: %s\t0\t\t\n' "$1" "$2" >>"$PARTS"
    echo "$1: skipped: $2"
}

if ! "$PYTHON" -c "import lpips, dlib, defusedxml" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        part install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" .whl/*.whl
    else
        part install 300 "$PYTHON" -m pip install -q --retries 1 --timeout 10 -e .
    fi
fi
export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${STITCHTIME_REFERENCE:-}" ] && [ -d .whl/stylegan2-ada-pytorch ]; then
    export STITCHTIME_REFERENCE=$ROOT/.whl/stylegan2-ada-pytorch
fi

if [ "$DEVICE" = cuda ]; then
    SIZES=${GPU_CHECK_SIZES:-256 1024} STEPS=${GPU_CHECK_STEPS:-20} CHANNELS=ffhq
    CLIP=(--frames 8 --batch 8 --long-frames 32 --pti-steps 5)
    PTI_BATCHES=(1 4 8) GENERATOR_BATCHES=(1 8)
else
    SIZES=${GPU_CHECK_SIZES:-64} STEPS=${GPU_CHECK_STEPS:-2} CHANNELS=tiny
    CLIP=(--frames 2 --batch 2 --long-frames 4 --pti-steps 1)
    PTI_BATCHES=(1 2) GENERATOR_BATCHES=(1 2)
fi
CLIP+=(--channels "$CHANNELS" --steps "$STEPS")
# With the reference there, its loop stands for the naive one (the same loop on our generator).
if [ -n "${STITCHTIME_REFERENCE:-}" ]; then LOOP=reference; else LOOP=naive; fi
read -ra OPTIONS <<<"${GPU_CHECK_OPTIONS:-fp32 bf16 channels-last compile}"
declare -A FLAGS=([fp32]="" [bf16]="--dtype bf16" [channels-last]="--channels-last" [compile]="--compile")
declare -A LIMITS=([fp32]=200 [bf16]=60 [channels-last]=60 [compile]=180)

# In order of what matters most, as later parts are the ones the budget may leave out. The gpu-marked tests
# are in tests/core, whose fixtures need no Prefect, boto3 or ffmpeg (tests/conftest.py's do).
mapfile -t GPU_TESTS < <(grep -rl "pytest.mark.gpu" tests/core --include="test_*.py")
if ((${#GPU_TESTS[@]})); then
    part tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu --confcutdir=tests/core "${GPU_TESTS[@]}"
else
    skip tests "no gpu-marked tests in tests/core"
fi
# fp32 compares every method, at every batch; each other option runs ours alone at the largest batch.
for option in "${OPTIONS[@]}"; do
    if [ "$option" = fp32 ]; then
        METHOD=(--methods ours ours-batch1 $LOOP --pti-batches "${PTI_BATCHES[@]}")
        BATCHES=("${GENERATOR_BATCHES[@]}")
    else
        METHOD=(--methods ours --long-frames 0 --pti-batches "${PTI_BATCHES[-1]}")
        BATCHES=("${GENERATOR_BATCHES[-1]}")
    fi
    for size in $SIZES; do
        # shellcheck disable=SC2086  # FLAGS hold zero to two words
        part "method-$size-$option" "${LIMITS[$option]}" "$PYTHON" benchmarks/method.py --device "$DEVICE" \
            --sizes "$size" "${CLIP[@]}" "${METHOD[@]}" ${FLAGS[$option]} --out "$WORK/method-$size-$option.json"
    done
    # shellcheck disable=SC2086
    part "generator-$option" "${LIMITS[$option]}" "$PYTHON" benchmarks/generator.py --device "$DEVICE" \
        --sizes $SIZES --channels "$CHANNELS" --batches "${BATCHES[@]}" ${FLAGS[$option]} \
        --out "$WORK/generator-$option.json"
done
if [ "$DEVICE" != cuda ]; then
    skip reference-cuda-ops "no CUDA device"
elif [ -z "${STITCHTIME_REFERENCE:-}" ]; then
    skip reference-cuda-ops "no stylegan2-ada-pytorch source (STITCHTIME_REFERENCE or .whl/stylegan2-ada-pytorch)"
else
    # shellcheck disable=SC2086
    part reference-cuda-ops 180 "$PYTHON" benchmarks/method.py --device cuda --sizes $SIZES "${CLIP[@]}" \
        --methods reference --reference-ops cuda --out "$WORK/reference-cuda-ops.json"
fi
if ! command -v ffmpeg >/dev/null; then
    skip pipeline "no ffmpeg binary"
elif ! "$PYTHON" -c "import prefect" 2>/dev/null; then
    skip pipeline "Prefect is not installed"
else
    part pipeline 240 "$PYTHON" benchmarks/pipeline.py --device "$DEVICE" --frames 25 --workers \
        --out "$WORK/pipeline.json"
fi

"$PYTHON" - "$WORK" "$RESULT" "$DEVICE" <<'EOF'
import json
import os
import platform
import sys
from pathlib import Path

work, result, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
parts = {}
for line in (work / "parts.tsv").read_text().splitlines():
    name, status, seconds, code, command = line.split("\t")
    log, out = work / f"{name}.log", work / f"{name}.json"
    parts[name] = {"status": status, "seconds": int(seconds), "exit_code": int(code) if code else None,
                   "command": command, "result": json.loads(out.read_text()) if out.exists() else None,
                   "log": log.read_text(errors="replace")[-20000:] if log.exists() else None}
machine = {"python": platform.python_version(), "cpu": platform.machine(), "cores": os.cpu_count()}
try:
    import torch

    machine.update(torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        machine.update(gpu=properties.name, gpu_memory_mb=properties.total_memory // 2**20)
except ImportError as exc:
    machine["torch"] = str(exc)
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps({"check": "benchmarks/gpu_check.sh", "device": device, "machine": machine,
                              "parts": parts}, indent=2) + "\n")
print(f"wrote {result}: " + ", ".join(f"{name} {part['status']}" for name, part in parts.items()))
EOF
rm -rf "$WORK"
