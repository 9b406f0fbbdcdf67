#!/usr/bin/env bash
# One-shot check of nnrelief on a GPU machine (issue 9), about 6 minutes on an H100.
#
#   scripts/device_check.sh DATA_DIR [OUT_DIR]      # OUT_DIR defaults to ./device-out
#   scripts/device_check.sh --dry-run DATA_DIR      # print the steps, run nothing
#
# DATA_DIR must hold cifar-10-batches-py (as unpacked by ../shared/tools/pack-cifar10, see
# docs in ../shared/docs/GPU.md). Runs from the source tree (PYTHONPATH=src), needs
# nothing beyond torch with CUDA, numpy, tqdm and pytest. Steps, each under its own time
# limit so the whole stays within budget; a failed or timed-out step is recorded and the
# next one still runs:
#   1. pytest -m cuda                               (GPU tests)
#   2. benchmarks/prune_pass.py --device cuda       (pass / forward ratios)
#   3. benchmarks/train_epoch.py --device cuda      (fit vs plain loop, masked vs dense, profile)
#   4. a short VGG-like CIFAR-10 pruning run: 10 dense epochs + 2 iterations of 3, bf16
# Writes OUT_DIR/device-check.log (everything) and OUT_DIR/summary.txt (the figures).
# Exit status: 0 if every step passed, 1 if any failed, 2 on bad usage or no CUDA.
set -u -o pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 [--dry-run] DATA_DIR [OUT_DIR]   (DATA_DIR holds cifar-10-batches-py)" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_dir="$(cd "$1" 2>/dev/null && pwd)" || { echo "error: DATA_DIR '$1' is not a directory" >&2; exit 2; }
if [[ ! -d "$data_dir/cifar-10-batches-py" ]]; then
    echo "error: $data_dir/cifar-10-batches-py not found; unpack CIFAR-10 there first (see ../shared/docs/GPU.md)" >&2
    exit 2
fi
out_dir="${2:-./device-out}"
python="${PYTHON:-python}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export NNRELIEF_SHARED_DATA="$data_dir"
export PYTHONUNBUFFERED=1

run_dir_arg() { echo "$out_dir/vgglike-run"; }
steps=(
    "cuda-tests|100|$python -m pytest -m cuda -q -p no:cacheprovider $root/tests"
    "prune-pass|70|$python $root/benchmarks/prune_pass.py --device cuda --repeats 3 --data-dir $data_dir --models vgg_like resnet20"
    "train-epoch|90|$python $root/benchmarks/train_epoch.py --device cuda --epochs 3 --data-dir $data_dir --profile $out_dir/train-profile.txt"
    "pruning-run|100|$python -m nnrelief -v prune --preset vgglike-cifar10 --data-dir $data_dir --device cuda --amp bf16 --epochs 10 --milestones --retrain-epochs 3 --retrain-milestones --num-iters 2 --no-progress --run-dir $(run_dir_arg)"
)

if [[ $dry_run -eq 1 ]]; then
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        echo "[$name, at most ${limit}s] $command"
    done
    exit 0
fi

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: CUDA is not available to '$python' (PYTHONPATH=$PYTHONPATH); run this on the GPU machine" >&2
    exit 2
fi
mkdir -p "$out_dir"
log="$out_dir/device-check.log"
summary="$out_dir/summary.txt"
rm -rf "$(run_dir_arg)"
: >"$log"
{
    echo "nnrelief device check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "git: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$python" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}')"
} | tee "$summary" >>"$log"

failed=0
for step in "${steps[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    echo "=== $name (at most ${limit}s): $command" >>"$log"
    start=$SECONDS
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout --kill-after=10 "$limit" $command >"$out_dir/$name.out" 2>&1
    status=$?
    cat "$out_dir/$name.out" >>"$log"
    case $status in
        0) verdict="ok" ;;
        124 | 137) verdict="TIMED OUT after ${limit}s"; failed=1 ;;
        *) verdict="FAILED (exit $status)"; failed=1 ;;
    esac
    echo "=== $name: $verdict in $((SECONDS - start))s" | tee -a "$summary" >>"$log"
    case $name in
        cuda-tests) grep -E "passed|failed|error" "$out_dir/$name.out" | tail -n 1 ;;
        prune-pass) grep -vE "^(\s*$|Traceback)" "$out_dir/$name.out" | tail -n 6 ;;
        train-epoch) tail -n 6 "$out_dir/$name.out" ;;
        pruning-run)
            grep -E "epoch [0-9]+/[0-9]+ \(" "$out_dir/$name.out" | sed -E 's/.*(epoch [0-9]+\/[0-9]+ \([^)]*\)).*\| ([0-9.]+s)$/\1: \2/' \
                | awk '{print "  " $0}' | tail -n 16
            tail -n 12 "$out_dir/$name.out" ;;
    esac >>"$summary"
done
echo "overall: $([[ $failed -eq 0 ]] && echo ok || echo 'SOME STEPS FAILED') in ${SECONDS}s" | tee -a "$summary" >>"$log"
cat "$summary"
exit $failed
