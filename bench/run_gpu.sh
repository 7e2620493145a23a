#!/usr/bin/env bash
# One GPU run: build the extension against the machine's torch, run the GPU tests and the
# benchmarks, write every log and JSON line under $OUT (default ./out).
#   bash bench/run_gpu.sh tests    # build + GPU tests (-m gpu)
#   bash bench/run_gpu.sh micro    # update / switch / backward-by-depth benchmarks
#   bash bench/run_gpu.sh e2e      # end to end (8B, 1B)
#   bash bench/run_gpu.sh budget   # the 24 GB budget search: badam_ext with its memory savings, the reference,
#                                  # the reference with Liger-Kernel's patches (carry the liger-kernel wheel)
#   bash bench/run_gpu.sh memory   # the memory planner against measured peaks, offload on / off
#   bash bench/run_gpu.sh dp       # data parallel on 2 GPUs (torchrun)
# Stages may be combined: bash bench/run_gpu.sh tests micro
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
# The launch-configuration cache (python -m badam_ext.kernels.tune writes it) comes back with the outputs.
export BADAM_EXT_CACHE=${BADAM_EXT_CACHE:-$OUT/launch-cache}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Multicast over NVLink stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [[ -d .whl ]]; then  # wheels carried for packages the GPU machine lacks (badam, liger-kernel)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# Optional comparisons (torchao, and bitsandbytes unpacked with only its CUDA 13.0 library), on the path
# only for the stages that compare with them: importing torchao initialises CUDA, which the benches'
# fork isolation forbids in the parent process.
OPT_PATH=${PYTHONPATH:-}
if [[ -d .whl/opt ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_opt .whl/opt/*.whl 2>/dev/null
  OPT_PATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site_opt:$PWD/.whl/opt/site
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
BADAM_SYSTEM_PYTHON=1 bash scripts/setup.sh > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"

run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  local s=$(date +%s)
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc in $(( $(date +%s) - s )) s"
}

# Nsight Compute of one fused step (the sixth launch: after the warm-up compilations)
NCU_ONE_STEP=(ncu --clock-control none --kernel-name-base function -k regex:fused_adamw -s 5 -c 1)

for stage in "$@"; do
  case $stage in
    launch)  # tune BLOCK x warps on this GPU (writes the cache), then the step and load beside torch AdamW
      run bench_launch python3 bench/bench_launch.py --out "$OUT/results.jsonl" ;;
    tests) run gpu_tests python3 -m pytest -m gpu -q --timeout=300 -p no:cacheprovider tests ;;
    tests-kernels) run gpu_tests_kernels python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_arena.py \
      tests/test_kernels_8bit.py tests/test_kernels_gpu_large.py tests/test_optimizer_states.py tests/test_kernels_adamw.py \
      tests/test_kernels_load_norm.py tests/test_kernels_tables.py tests/test_gpu_optimizer.py tests/test_launch_config.py ;;
    micro)
      run bench_update python3 bench/bench_update.py --out "$OUT/results.jsonl"
      run bench_switch python3 bench/bench_switch.py --out "$OUT/results.jsonl"
      run bench_backward python3 bench/bench_backward.py --out "$OUT/results.jsonl" ;;
    e2e)
      run bench_e2e_8b python3 bench/bench_e2e.py --model 8b --out "$OUT/results.jsonl"
      run bench_e2e_1b python3 bench/bench_e2e.py --model 1b --out "$OUT/results.jsonl" ;;
    budget)
      run bench_budget python3 bench/bench_budget.py --batch 1 --optimizers ref,ref_liger,ours_saved \
        --lengths-for ref=2048,3072 --lengths-for ref_liger=12288,14336 \
        --lengths-for ours_saved=24576,28672 --bisect-granularity 2048 --out "$OUT/results.jsonl" ;;
    states-sweep)  # the 8-bit step over launch configurations (ours only)
      run bench_states_sweep python3 bench/bench_states.py --formats 8bit,8bit-nomaster,fp32 --no-baselines \
        --launch 256x2,256x4,512x2,512x4,512x8,1024x4,1024x8,2048x8 --out "$OUT/results.jsonl" ;;
    states-prefetch)  # the 8-bit step's L2 prefetch distance against its register cap
      run bench_states_prefetch python3 bench/bench_states.py --formats 8bit,8bit-nomaster --no-baselines \
        --prefetch 0,1024,3072 --maxnreg 64,72,80,96 --out "$OUT/results.jsonl" ;;
    states-load)  # the block load per format with 1-8 chunks per program, beside the default
      run bench_states_load python3 bench/bench_states.py --formats fp32,8bit,8bit-nomaster --no-baselines \
        --load-chunks 1,2,4,8,16 --out "$OUT/results.jsonl" ;;
    compile)  # regional compilation with non-reentrant checkpointing on a small model (then: compile-e2e)
      run diagnose_compile python3 bench/diagnose_compile.py --variants regional,traced ;;
    states-8bit)  # the 8-bit step over launch configurations (ours only; 256 x 1 keeps a block's row in one warp)
      run bench_states_8bit python3 bench/bench_states.py --formats 8bit,8bit-nomaster --no-baselines \
        --launch 256x1,256x2,512x1,512x2,512x4,1024x4,1024x8 --out "$OUT/results.jsonl" ;;
    states-flat)  # the fp32 step on the 8B layer's 9 tensors and on one flat tensor of the same size (what the tables cost)
      for layer in llama3-8b flat; do
        run "bench_states_fp32_$layer" python3 bench/bench_states.py --formats fp32 --no-baselines --layer "$layer" \
          --launch 512x4,1024x4 --out "$OUT/results.jsonl"
      done ;;
    ncu-8bit-memory)  # Nsight Compute of one 8-bit step at the H200's entry (256 x 1, 64 registers, L2 prefetch): where L1 time goes
      run ncu_8bit_memory "${NCU_ONE_STEP[@]}" --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
        --section WarpStateStats --section SourceCounters --import-source no -o "$OUT/ncu-8bit" \
        python3 bench/bench_states.py --formats 8bit --no-baselines
      run ncu_8bit_memory_details ncu --import "$OUT/ncu-8bit.ncu-rep" --page details
      run ncu_8bit_memory_sass ncu --import "$OUT/ncu-8bit.ncu-rep" --page source --csv --print-source sass ;;
    ncu-8bit)  # Nsight Compute of one 8-bit step at the H200's 256 x 1: the summary sections
      run ncu_8bit "${NCU_ONE_STEP[@]}" --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section InstructionStats --section WarpStateStats \
        python3 bench/bench_states.py --formats 8bit --no-baselines --launch 256x1 ;;
    profile-32)  # all 32 layers of the 8B shape, block 10 active: step times, host syncs, traces, eager / compiled
      for variant in eager compiled compiled-aot_eager; do
        flags=(--layers 32 --start-block 8 --warmup 2 --sync-debug --trace "$OUT/trace-$variant.json.gz")
        [[ $variant == compiled* ]] && flags+=(--compiled)
        [[ $variant == *aot_eager ]] && flags+=(--compile-backend aot_eager)
        run "profile32_$variant" python3 bench/profile_step.py "${flags[@]}"
      done ;;
    profile)  # one step's device time by kernel, eager and regionally compiled layers (8 layers of the 8B shape)
      run profile_eager python3 bench/profile_step.py --layers 8
      run profile_compiled python3 bench/profile_step.py --layers 8 --compiled ;;
    compile-e2e)  # the 8B step: eager and compiled, with and without the memory savings
      run bench_e2e_compile python3 bench/bench_e2e.py --model 8b \
        --variants ours,ours_compiled,ours_saved,ours_saved_compiled --out "$OUT/results.jsonl" ;;
    states)  # state formats: speed vs copy bandwidth, then accuracy, beside torchao / bitsandbytes
      PYTHONPATH=$OPT_PATH run bench_states python3 bench/bench_states.py --out "$OUT/results.jsonl"
      PYTHONPATH=$OPT_PATH run bench_states_accuracy python3 bench/bench_states.py --accuracy --out "$OUT/results.jsonl" ;;
    states-finetune)
      run bench_states_finetune python3 bench/bench_states.py --finetune --seeds 0,1,2 --out "$OUT/results.jsonl" ;;
    budget-8bit)  # the stretch goal: 32768 tokens in 23 GiB with BlockAdam(states="8bit")
      run bench_budget_8bit python3 bench/bench_budget.py --batch 1 --optimizers ours_saved_8bit \
        --lengths-for ours_saved_8bit=32768 --out "$OUT/results.jsonl" ;;
    memory)
      run bench_memory python3 bench/bench_memory.py --out "$OUT/results.jsonl" ;;
    memory-check)  # shapes and a model the planner was not fitted on
      run bench_memory_check_8b python3 bench/bench_memory.py --shapes 2x2048,1x12288,1x20480,1x26624 --out "$OUT/results.jsonl"
      run bench_memory_check_1b python3 bench/bench_memory.py --model 1b --shapes 2x1024,1x8192,1x16384 --out "$OUT/results.jsonl" ;;
    e2e-memory)  # the step with the memory savings against the plain one (and regional compilation)
      run bench_e2e_memory python3 bench/bench_e2e.py --model 8b \
        --variants ours,ours_saved,ours_liger,ours_compiled --out "$OUT/results.jsonl" ;;
    gpu-tests-memory)
      run gpu_tests_memory python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_memory_loss.py \
        tests/test_offload.py tests/test_layer_kernels.py ;;
    loss)  # the loss alone: Hugging Face's, Liger's default chunking, ours
      run bench_loss python3 bench/bench_loss.py --tokens 2048,8192,16384 --out "$OUT/results.jsonl" ;;
    offload)  # host-link bandwidth and the offload's cost, with a profile of one offloaded step
      run bench_offload python3 bench/bench_offload.py --shapes 2x1024,1x4096 --profile --out "$OUT/results.jsonl" ;;
    e2e-saved)  # 2 x 1024 step: plain, memory savings (layer kernels on / off), offload forced, compiled
      run bench_e2e_saved python3 bench/bench_e2e.py --model 8b \
        --variants ours,ours_saved,ours_offload,ours_compiled --out "$OUT/results.jsonl"
      BADAM_LAYER_KERNELS=0 run bench_e2e_saved_hf_layers python3 bench/bench_e2e.py --model 8b \
        --variants ours_saved --out "$OUT/results.jsonl" ;;
    memory-lean)  # the planner's layer-kernel coefficients: measured peaks with Liger's RMSNorm / SwiGLU
      run bench_memory_lean python3 bench/bench_memory.py --layer-kernels on \
        --shapes 2x1024,1x8192,1x16384,1x24576 --out "$OUT/results.jsonl" ;;
    dp) run bench_dp torchrun --standalone --nproc_per_node 2 bench/bench_dp.py --out "$OUT/results.jsonl" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
