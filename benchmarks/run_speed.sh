#!/usr/bin/env bash
# One-GPU QLoRA speed in one device call (nvidia-h200): a random Llama-2-7B-shaped NF4 checkpoint made
# with the project's bnb quantizer, then benchmarks/qlora_speed.py's modes in one process (stock HF,
# the project's QLoRA path before/after the profile's speed options, real-data lengths padded vs
# packed, eval generation batched vs batch 1, activation offload, HF + Liger), then the table.
# Carried: .site-speed (wheels: transformers 5.23, trl 1.16, datasets, peft 0.21.2, bitsandbytes
# 0.50.2 pruned to its CUDA 13.0 library, liger-kernel 0.8.5, hydra/omegaconf; lengths.json).
# ONLY=recheck: the second call (check with its noise floor, real data and fixed shape after the
# fixed-width fix). ONLY=extra: the other 7B shapes (8 layers) and full SFT of a 1.1B shape.
# ONLY=gptq: GPTQ quantization time of the 7B and QLoRA over GPTQ vs NF4 (also carry .site-qalora).
# ONLY=next: a kernel profile of the project's step and GPTQ with CUDA packing (not run yet).
set -u
OUT=${OUT:-$PWD/bench_out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if ls .site-speed/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .site-speed/whl/*.whl > "$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
echo "pip install done ${SECONDS}s"
R=$OUT/results.jsonl
S="python3 benchmarks/qlora_speed.py"
shm() { [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -gt "$1" ] 2>/dev/null && echo /dev/shm || echo /tmp; }
B=$(shm 24)
use_gptq_site() {  # gptqmodel and its pure-Python deps, pruned (.site-gptq; RESULTS.md says what is in it)
  export PYTHONPATH=$PYTHONPATH:$PWD/.site-gptq/py LD_LIBRARY_PATH=$PWD/.site-gptq/lib USE_HUB_KERNELS=0
}
install_unsloth_site() {  # unsloth runs in its own process on the image's transformers (benchmarks/UNSLOTH.md)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-unsloth .site-unsloth/whl/*.whl \
    .site-speed/whl/{bitsandbytes,peft,dill,multiprocess}-*.whl >> "$OUT/pip.txt" 2>&1 || tail -3 "$OUT/pip.txt"
}
make_llama2() {  # make_llama2 TIMEOUT_S [make flags...]: the random Llama-2-7B-shaped checkpoints in $B/llama2
  local limit=$1; shift
  timeout "$limit" $S make --dir $B/llama2 --arch llama2 "$@" --out "$R" 2>&1 | grep -E '^\{|Error' | tail -3
  echo "make done ${SECONDS}s"
}
run_fresh() {  # run_fresh LIMIT_S MODE...: each mode in its own fresh process, 20 steps (3..20 timed); unsloth is
  # benchmarks/unsloth_peer.py; a mode is skipped once the call has run LIMIT_S seconds
  local limit=$1 m; shift
  for m in "$@"; do
    [ $SECONDS -gt "$limit" ] && { echo "skipped $m (time)"; continue; }
    if [ "$m" = unsloth ]; then
      env PYTHONPATH=/tmp/site-unsloth:$PWD timeout 120 python3 benchmarks/unsloth_peer.py --steps 20 --dir $B/llama2 \
        --out "$R" >> "$OUT/log_unsloth.txt" 2>&1
    else
      timeout 100 $S run --dir $B/llama2 --arch llama2 --steps 20 --modes "$m" --out "$R" >> "$OUT/log.txt" 2>&1
    fi
    echo "$m rc=$? ${SECONDS}s"
  done
}
if [ "${ONLY:-}" = recheck ]; then  # the second call: fixed-width packed batches, check with its noise floor
  make_llama2 100
  timeout 120 $S run --dir $B/llama2 --arch llama2 --budget-s 70 --modes check,real,project --out "$R" > "$OUT/log.txt" 2>&1
  echo "run rc=$? ${SECONDS}s"
elif [ "${ONLY:-}" = gptq ]; then  # GPTQ: the PTQ stage's quantizer on the 7B (timed), QLoRA over it vs NF4
  # gptqmodel and its pure-Python deps travel in .site-qalora (see RESULTS.md, QA-LoRA)
  export PYTHONPATH=$PYTHONPATH:$PWD/.site-qalora/py LD_LIBRARY_PATH=$PWD/.site-qalora/lib USE_HUB_KERNELS=0
  timeout 230 $S make --dir $B/llama2 --arch llama2 --gptq --out "$R" > "$OUT/log_make.txt" 2>&1
  rc=$?; grep -E '^\{"what": "make' "$R" | cut -c1-300; echo "make rc=$rc ${SECONDS}s"
  timeout 170 $S run --dir $B/llama2 --arch llama2 --budget-s 100 \
    --modes project,project_gptq,gptq_check,hf_gptq,project_gptq_plain --out "$R" > "$OUT/log.txt" 2>&1
  echo "run rc=$? ${SECONDS}s"
elif [ "${ONLY:-}" = next ]; then  # third session, call 1: where a step's time goes, the one-addmm LoRA add,
  # QLoRA over GPTQ with the dequantization straight to bf16 (and its gradient check)
  export PYTHONPATH=$PYTHONPATH:$PWD/.site-qalora/py LD_LIBRARY_PATH=$PWD/.site-qalora/lib USE_HUB_KERNELS=0
  make_llama2 150 --gptq-random
  timeout 330 $S run --dir $B/llama2 --arch llama2 --budget-s 250 \
    --modes profile,project,project_fusedlora,project_gptq,gptq_check --out "$R" > "$OUT/log.txt" 2>&1
  echo "run rc=$? ${SECONDS}s"
elif [ "${ONLY:-}" = final ]; then  # third session, call 3 (carry .site-speed, .site-unsloth, .site-gptq): the
  # h200 profile (fused_lora with sibling groups, async offload, fused AdamW) beside unsloth, stock HF, the GPU
  # gradient checks (NF4 fast vs plain, GPTQ), QLoRA over GPTQ; 16 steps a mode (steps 3..16 timed)
  use_gptq_site
  make_llama2 150 --keep-bf16 --gptq-random
  timeout 150 $S run --dir $B/llama2 --arch llama2 --steps 16 --modes project,project_nogroup --out "$R" > "$OUT/log.txt" 2>&1
  echo "run A rc=$? ${SECONDS}s"
  install_unsloth_site
  env PYTHONPATH=/tmp/site-unsloth:$PWD timeout 150 python3 benchmarks/unsloth_peer.py --steps 16 --dir $B/llama2 \
    --out "$R" > "$OUT/log_unsloth.txt" 2>&1
  echo "unsloth rc=$? ${SECONDS}s"; rm -rf $B/llama2/bf16
  BB=$((470 - SECONDS)); [ $BB -lt 5 ] && BB=5
  timeout $((585 - SECONDS)) $S run --dir $B/llama2 --arch llama2 --steps 16 --budget-s $BB \
    --modes check,hf,project_gptq,gptq_check --out "$R" >> "$OUT/log.txt" 2>&1
  echo "run B rc=$? ${SECONDS}s"
  rm -rf $B/llama2  # is a dropped GPTQ model's memory given back (the leak fix, not yet seen on a GPU)?
  timeout $((590 - SECONDS)) python3 benchmarks/gptq_release_check.py --dir $B/grc --layers 4 2>>"$OUT/log.txt" | grep '^{' >> "$R"
elif [ "${ONLY:-}" = compile ]; then  # not run yet: hardware.compile_layers (each of the 32 blocks compiles its own
  # graph: minutes before the first step) beside the profile's path; carry .site-speed
  make_llama2 150
  timeout 420 $S run --dir $B/llama2 --arch llama2 --steps 16 --modes project,project_compiled --out "$R" > "$OUT/log.txt" 2>&1
  echo "run rc=$? ${SECONDS}s"
elif [ "${ONLY:-}" = side ]; then  # third session, call 2 (carry .site-speed + .site-unsloth): fused_lora and the
  # asynchronous activation offload beside unsloth on this GPU (its own process with the image's transformers
  # 5.17 and trl 1.15: benchmarks/UNSLOTH.md), stock HF, a profile, the offload's gradient check
  make_llama2 150 --keep-bf16
  timeout 200 $S run --dir $B/llama2 --arch llama2 --steps 10 --modes project,project_offload,project_unfused --out "$R" > "$OUT/log.txt" 2>&1
  echo "run A rc=$? ${SECONDS}s"
  install_unsloth_site
  U="env PYTHONPATH=/tmp/site-unsloth:$PWD python3 benchmarks/unsloth_peer.py --steps 10"  # /tmp/site (trl 1.16) left off
  timeout 200 $U --dir $B/llama2 --out "$R" > "$OUT/log_unsloth.txt" 2>&1 || { [ $SECONDS -lt 330 ] &&
    timeout 150 $U --from-bf16 $B/llama2/bf16 --out "$R" >> "$OUT/log_unsloth.txt" 2>&1; }
  echo "unsloth rc=$? ${SECONDS}s"; rm -rf $B/llama2/bf16
  BB=$((450 - SECONDS)); [ $BB -lt 5 ] && BB=5
  timeout $((510 - SECONDS)) $S run --dir $B/llama2 --arch llama2 --steps 10 --budget-s $BB \
    --modes hf,profile --out "$R" >> "$OUT/log.txt" 2>&1
  echo "run B rc=$? ${SECONDS}s"
  rm -rf $B/llama2  # the offload check: gradients vs torch's checkpoint on a smaller random model (GPU check)
  timeout $((580 - SECONDS)) python3 -m ptq_qlora.activation_offload > "$OUT/log_selfcheck.txt" 2>&1
  echo "offload selfcheck rc=$? ${SECONDS}s"; tail -8 "$OUT/log_selfcheck.txt"
elif [ "${ONLY:-}" = gptqpack ]; then  # GPTQ time: the baseline script (4 layers, 128 x 2048 tokens) beside
  # the PTQ stage's quantizer on 4 layers with gptqmodel's default (CPU) packing and its CUDA packing, then 32 layers
  use_gptq_site
  GPTQ_DIR=$B/gb timeout 150 python3 benchmarks/gptq_time_baseline.py 4 128 2048 > "$OUT/log_baseline.txt" 2>&1
  grep '^{' "$OUT/log_baseline.txt" | tee -a "$R"; rm -rf $B/gb; echo "baseline done ${SECONDS}s"
  for impl in "" gpu; do
    PACK_IMPL=$impl timeout 150 $S make --dir $B/g4$impl --arch llama2 --layers 4 --gptq --out "$R" > "$OUT/log_make4$impl.txt" 2>&1
    rm -rf $B/g4$impl; echo "4 layers pack_impl=${impl:-default} rc=$? ${SECONDS}s"
  done
  if [ -n "${FULL_PACK:-}" ]; then  # all 32 layers with that packing (FULL_PACK=gpu or default)
    PACK_IMPL=${FULL_PACK#default} timeout $((570 - SECONDS)) $S make --dir $B/g2 --arch llama2 --gptq --out "$R" > "$OUT/log_make.txt" 2>&1
    echo "gptq 32 layers rc=$? ${SECONDS}s"
  fi
elif [ "${ONLY:-}" = gptqblock ]; then  # fourth session, call 1 (carry .site-speed, .site-gptq with gptqmodel_ext's
  # gptq_block sources): gptqmodel's fused CUDA block update, which the earlier carry lacked (so GPTQ ran its
  # per-column Python loop), built once with nvcc; then the baseline script, the stage's quantizer on 4 layers
  # and on the whole 7B; then whether a dropped GPTQ model gives its memory back (the leak fix)
  use_gptq_site
  python3 -c "import time; t=time.time(); from gptqmodel.quantization import gptq_cuda as g; ok=g.block_update_available(); \
import json; print(json.dumps({'what': 'gptq_block_build', 'ok': ok, 'seconds': round(time.time()-t, 1), 'error': g._EXTENSION._last_error[-400:]}))" \
    > "$OUT/log_build.txt" 2>&1; grep '^{' "$OUT/log_build.txt" | tee -a "$R"; echo "build done ${SECONDS}s"
  GPTQ_DIR=$B/gb timeout 150 python3 benchmarks/gptq_time_baseline.py 4 128 2048 > "$OUT/log_baseline.txt" 2>&1
  grep '^{' "$OUT/log_baseline.txt" | tee -a "$R"; rm -rf $B/gb; echo "baseline done ${SECONDS}s"
  timeout 120 $S make --dir $B/g4 --arch llama2 --layers 4 --gptq --out "$R" > "$OUT/log_make4.txt" 2>&1
  echo "4 layers rc=$? ${SECONDS}s"; rm -rf $B/g4
  timeout $((520 - SECONDS)) $S make --dir $B/g32 --arch llama2 --gptq --out "$R" > "$OUT/log_make32.txt" 2>&1
  echo "32 layers rc=$? ${SECONDS}s"; rm -rf $B/g32
  timeout $((590 - SECONDS)) python3 benchmarks/gptq_release_check.py --dir $B/grc --layers 4 2>>"$OUT/log_release.txt" | grep '^{' >> "$R"
  echo "release check rc=$? ${SECONDS}s"
elif [ "${ONLY:-}" = ab ]; then  # fourth session, call 2 (carry .site-speed, .site-unsloth, .site-gptq): the h200
  # profile's QLoRA path and unsloth alternated, each in a fresh process (no memory left by an earlier mode, two
  # rounds for the noise), and QLoRA over GPTQ in its own fresh process; 24 steps a run (steps 3..24 timed)
  use_gptq_site
  make_llama2 150 --keep-bf16 --gptq-random
  install_unsloth_site
  for round in 1 2; do
    timeout 100 $S run --dir $B/llama2 --arch llama2 --steps 24 --modes project --out "$R" >> "$OUT/log.txt" 2>&1
    echo "project round $round rc=$? ${SECONDS}s"
    env PYTHONPATH=/tmp/site-unsloth:$PWD timeout 140 python3 benchmarks/unsloth_peer.py --steps 24 --dir $B/llama2 \
      --out "$R" >> "$OUT/log_unsloth.txt" 2>&1
    echo "unsloth round $round rc=$? ${SECONDS}s"
    if [ $round = 1 ]; then
      timeout 100 $S run --dir $B/llama2 --arch llama2 --steps 24 --modes project_gptq --out "$R" >> "$OUT/log.txt" 2>&1
      echo "project_gptq rc=$? ${SECONDS}s"
    fi
  done
  rm -rf $B/llama2  # then, if time is left: is a dropped GPTQ model's memory given back (the leak fix)?
  [ $SECONDS -lt 540 ] && timeout $((590 - SECONDS)) python3 benchmarks/gptq_release_check.py --dir $B/grc --layers 4 \
    2>>"$OUT/log_release.txt" | grep '^{' >> "$R"; echo "release check ${SECONDS}s"
elif [ "${ONLY:-}" = s5 ]; then  # fifth session, call 1, at commit 1a21bf7 (project_cudnn* and the sdpa_priority
  # option were removed after it; carry .site-speed, .site-unsloth): which attention kernel
  # sdpa runs and cuDNN's gradients vs flash's; then fresh processes alternated: the h200 profile as it was,
  # + sdpa_priority [cudnn], + keep_recomputed_weights, unsloth; 20 steps a run (steps 3..20 timed)
  make_llama2 150
  install_unsloth_site
  timeout 90 $S run --dir $B/llama2 --arch llama2 --modes sdpa_check --out "$R" > "$OUT/log_check.txt" 2>&1
  echo "sdpa_check rc=$? ${SECONDS}s"
  run_fresh 520 project project_cudnn project_cudnn_keep unsloth project_cudnn_keep unsloth project
elif [ "${ONLY:-}" = s5b ]; then  # fifth session, call 2 (carry .site-speed, .site-unsloth): where the step with
  # keep_recomputed_weights spends its time (kernels, GPU idle), and what the Trainer's step costs (the same
  # model path in the peers' plain loop; the profile's data-loading workers); unsloth beside them
  make_llama2 150
  install_unsloth_site
  run_fresh 500 profile_keep project_keep project_keep_loop project_keep_workers unsloth
  # (this call printed profile_keep's summary and 40 largest kernels with a one-off python -c; `table` below now
  # prints the summary, and results.jsonl holds the kernels)
elif [ "${ONLY:-}" = s5c ]; then  # fifth session, call 3 (carry .site-speed, .site-unsloth, .site-gptq): model_loss
  # (the model's own Liger fused loss instead of TRL's head and its per-step metric syncs) beside the profile without
  # it and unsloth, alternated in fresh processes, 20 steps (3..20 timed); then over GPTQ and on real-data rows
  use_gptq_site
  make_llama2 150 --gptq-random
  install_unsloth_site
  run_fresh 500 project_keep project_modelloss unsloth project_modelloss unsloth project_keep project_gptq_modelloss real_modelloss
elif [ "${ONLY:-}" = s5d ]; then  # fifth session, call 4 (carry .site-speed, .site-unsloth; ~5 min of device time
  # left): model_loss at the stage's own logging interval (5 steps; the benchmark logged every step) beside unsloth
  make_llama2 120
  install_unsloth_site
  run_fresh 230 project_modelloss_log5 unsloth project_modelloss_log5
elif [ "${ONLY:-}" = s6 ]; then  # prepared in the fifth session, run in the sixth (call 1; carry .site-speed, .site-unsloth):
  # the Trainer's host syncs deferred to the step's end, alone and with model_loss, beside the profile and unsloth,
  # alternated in fresh processes; then the GPU idle time of the lean step (profile_lean)
  make_llama2 120
  install_unsloth_site
  run_fresh 480 project project_lean unsloth project_deferred project_lean unsloth project profile_lean
elif [ "${ONLY:-}" = s7 ]; then  # sixth session, call 2 (carry .site-speed, .site-unsloth, .site-gptq): the h200
  # profile with deferred_step_syncs now on, alternated with unsloth in fresh processes; then QLoRA over GPTQ and
  # what is live at the step's memory peak over NF4 and over GPTQ (by allocating line)
  use_gptq_site
  make_llama2 150 --gptq-random
  install_unsloth_site
  run_fresh 500 project unsloth project unsloth project_gptq memory_nf4 memory_gptq
elif [ "${ONLY:-}" = s8 ]; then  # sixth session, call 3 (carry .site-speed, .site-unsloth, .site-gptq): QLoRA over
  # GPTQ with its adapter in bfloat16 (as TRL keeps it over NF4) beside NF4 and unsloth; real-data rows with the
  # profile's deferred_step_syncs
  use_gptq_site
  make_llama2 150 --gptq-random
  install_unsloth_site
  run_fresh 430 project_gptq project unsloth project_gptq real
elif [ "${ONLY:-}" = s9 ]; then  # sixth session, call 4 (carry .site-speed, .site-gptq; ~5 min left): call 3's two
  # project_gptq runs failed inside transformers' from_pretrained (a kwargs dict holding a module's globals, then a
  # segfault at exit: memory corruption) where call 2's ran; the same mode again, and its memory at the peak
  use_gptq_site
  make_llama2 150 --gptq-random
  run_fresh 200 project_gptq memory_gptq
elif [ "${ONLY:-}" = extra ]; then
  for arch in qwen2 mistral; do
    timeout 90 $S make --dir $B/$arch --arch $arch --layers 8 --out "$R" 2>&1 | grep -E '^\{|Error' | tail -3
    timeout 120 $S run --dir $B/$arch --arch $arch --modes hf,project --out "$R" 2>&1 > "$OUT/log_$arch.txt"
    rm -rf $B/$arch; echo "$arch done ${SECONDS}s"
  done
  make_llama2 100
  timeout 150 $S run --dir $B/llama2 --arch llama2 --modes real,real_flex,project_flex --out "$R" > "$OUT/log_flex.txt" 2>&1
  rm -rf $B/llama2; echo "flex done ${SECONDS}s"
  timeout 60 $S make --dir $B/tl --arch tinyllama --keep-bf16 --out "$R" 2>&1 | grep -E '^\{|Error' | tail -3
  timeout 150 $S run --dir $B/tl --arch tinyllama --modes sft1b_before,sft1b --out "$R" > "$OUT/log_sft.txt" 2>&1
else
  make_llama2 120
  timeout 330 $S run --dir $B/llama2 --arch llama2 --budget-s 260 \
    --modes hf,project_before,real_before,gen,check,project,real,project_offload,liger --out "$R" > "$OUT/log.txt" 2>&1
  echo "run rc=$? ${SECONDS}s"
fi
grep -E 'Error|error' "$OUT"/log*.txt | grep -v -i "warn" | tail -8
$S table "$R" | tee "$OUT/table.md"
echo "done ${SECONDS}s"
