#!/usr/bin/env bash
# The GPU check: on a CUDA machine, everything that needs a GPU. Each step runs under its own time
# limit (about 20 minutes in all); name the steps that fit a shorter lease, e.g. `load tests`.
#
#   bash benchmarks/gpu_check.sh OUTDIR [STEP...]     (STEP: tests engine methods memory roofline load;
#                                                     default all, in this order)
#
# 1. the tests marked `cuda` (tree verification against each branch alone, every method's
#    losslessness on tiny models alone and under load at concurrency 3 and 6, in float32 and
#    bfloat16; sampling on the device);
# 2. vanilla on the engine against model.generate, bf16, randomly initialised models of the
#    default model's shape and of a 1B Llama's shape (target: ratio >= 1.0);
# 3. every method end to end on a few prompts with random weights (speed and memory only);
# 4. peak GPU memory over many generations (it must not grow);
# 5. the roofline: the device's copy bandwidth, a decode step's limit and vanilla's step beside it;
# 6. the load sweep: every method's throughput and speedup at concurrency 1, 2, 4, 8 and 16, and
#    vanilla's throughput at each level over its throughput at 1.
# Models are built from configs (no downloads, no GGUF). The log goes to OUTDIR/gpu_check.log.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [STEP...]}
shift
steps=" ${*:-tests engine methods memory roofline load} "
for s in $steps; do
  case $s in tests|engine|methods|memory|roofline|load) ;; *) echo "unknown step '$s': use tests engine methods memory roofline load" >&2; exit 2;; esac
done
wants() { [[ $steps == *" $1 "* ]]; }
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, record failures, keep going
  local name=$1 limit=$2; shift 2
  echo; echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" || { echo "!! $name failed (exit $?)"; status=1; }
  echo "   ($name: $((SECONDS - t0)) s)"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  wants tests && step "CUDA tests" 240 python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
  wants engine && for shape in smollm2-135m llama-1b; do
    step "engine vs generate, $shape shape, bf16" 75 python benchmarks/engine_vs_generate.py --device cuda \
      --dtypes bfloat16 --model "random:$shape" --prompts 6 --new 64 --repeats 2
  done
  wants methods && for shape in smollm2-135m llama-1b; do
    step "every method, $shape shape, bf16" 120 python benchmarks/methods_speed.py --device cuda --dtype bfloat16 \
      --model "random:$shape" --prompts 4 --new 64
  done
  wants memory && step "memory over 100 generations" 90 python benchmarks/memory.py --device cuda --dtype bfloat16 \
    --model random:smollm2-135m --generations 100 --new 16
  wants roofline && for shape in smollm2-135m llama-1b; do
    step "roofline, $shape shape" 90 python benchmarks/roofline.py --device cuda --model "random:$shape" \
      --dtypes bfloat16 --methods vanilla,pld,lookahead --prompts 2 --new 32
  done
  wants load && for shape in smollm2-135m llama-1b; do
    step "load sweep, $shape shape, bf16" 170 python benchmarks/load.py --device cuda --dtype bfloat16 \
      --model "random:$shape" --methods vanilla,pld,lookahead,medusa,firp,self_spec --levels 1,2,4,8,16 \
      --requests 16 --new 32
  done
  echo; [ $status -eq 0 ] && echo "GPU CHECK PASSED" || echo "GPU CHECK FAILED"
  exit $status
} 2>&1 | tee "$out/gpu_check.log"
