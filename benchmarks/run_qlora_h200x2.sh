#!/usr/bin/env bash
# QLoRA data-parallel on 2 H200s in one device call (nvidia-h200-x2): the real `train.py` pipeline
# (SFT -> PTQ bnb NF4 -> QLoRA, each evaluated) on a tiny model under torchrun (QLoRA = DDP, the
# h200x2 profile), the QLoRA stage alone under FSDP2 over the same NF4 base, then a 7B-shaped NF4
# base with LoRA r16: DDP on 1 vs 2 GPUs and FSDP2 on 2 (benchmarks/qlora_dp.py).
# Carried: .whl (as run_h200x2.sh, plus bitsandbytes 0.50.2 pruned to its CUDA 13.0 library, and
# peft 0.21.2), .site/data (bitext + alpaca mirrors). Results land in $OUT (device tool) or ./bench_out.
set -u
OUT=${OUT:-$PWD/bench_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
LOG=$OUT/logs_tail.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /tmp /dev/shm | tail -2
  python3 -c 'import torch,transformers,accelerate,peft,bitsandbytes as b;print(torch.__version__,transformers.__version__,accelerate.__version__,peft.__version__,b.__version__,torch.cuda.device_count())'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
run() { local name=$1 cap=$2; shift 2; echo "=== $name: $*"; local t0=$SECONDS
  timeout "$cap" "$@" > "/tmp/$name.log" 2>&1; local rc=$?; echo "rc=$rc ${name} $((SECONDS-t0))s"
  grep -E '^\{"|Error|error:|OutOfMemory' "/tmp/$name.log" | grep -v Warning | cut -c1-1500 | tail -4
  { echo "=== $name rc=$rc $((SECONDS-t0))s: $*"; grep -v "torchao\|Enum subclass\|kernels-community\|FutureWarning\|warnings.warn" "/tmp/$name.log" | tail -40; } >> "$LOG"; }
budget() { [ "$SECONDS" -lt "$1" ] || { echo "skipping $2: ${SECONDS}s used" | tee -a "$LOG"; return 1; }; }

# 1. the real entry point: tiny model, SFT (FSDP2) -> PTQ bnb NF4 (rank 0) -> QLoRA (DDP), all evaluated
export PTQ_QLORA_DATA=$PWD/.site/data PTQ_QLORA_STORE=/tmp/runs
TINY="model=tiny-random quantizer=bnb-nf4 data=cpu data.max_train=64 data.max_dev=4 data.max_test=16 sft.epochs=1
  qlora.epochs=2 qlora.logging_steps=1 hardware.train_batch_size=4 hardware.eval_batch_size=8 eval.max_new_tokens=8"
run qlora_smoke 120 python3 -m torch.distributed.run --nproc_per_node 2 train.py hardware=h200x2 stage=pipeline $TINY \
  experiment_name=qlora_gpu_smoke
{ grep -v "torchao\|Enum subclass\|kernels-community\|FutureWarning\|warnings.warn" /tmp/qlora_smoke.log | tail -50
  echo "--- store:"; find /tmp/runs -maxdepth 2 | sort; for f in /tmp/runs/qlora-*/metrics.json; do echo "--- $f"; cat "$f"; done
  echo "--- adapter:"; ls -la /tmp/runs/qlora-*/adapter; echo "--- results:"; cat outputs/qlora_gpu_smoke/*/results.md
  head -c 6000 outputs/qlora_gpu_smoke/*/results.json; } > "$OUT/qlora_smoke.txt" 2>&1

[ "${ONLY:-}" = smoke ] && { echo "done ${SECONDS}s (ONLY=smoke)"; exit 0; }

# 2. 7B-shaped NF4 base (Llama-2-7B widths, 32 layers, random bf16 -> the project's bnb quantizer)
D=/tmp/q7b; [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -gt 24 ] 2>/dev/null && D=/dev/shm/q7b
Q="benchmarks/qlora_dp.py train --dir $D --batch 4 --seq 2048 --steps 6"
run make7b 150 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/qlora_dp.py make --dir $D --layers 32 --out "$OUT/make7b.json"
rm -rf "$D/bf16"
budget 360 ddp2 && run ddp2 70 python3 -m torch.distributed.run --nproc_per_node 2 $Q --accum 1 --out "$OUT/ddp2.json"
budget 380 ddp1 && run ddp1 90 env CUDA_VISIBLE_DEVICES=0 python3 -m torch.distributed.run --nproc_per_node 1 $Q --num-processes 1 --accum 2 --out "$OUT/ddp1.json"

# 3. FSDP2 QLoRA: the stage on the tiny PTQ model, then the 7B shape (4-bit weights re-viewed as bf16)
PTQ=$(ls -d /tmp/runs/ptq-* 2>/dev/null | head -1)
budget 380 fsdp_smoke && [ -n "$PTQ" ] && run fsdp_smoke 70 python3 -m torch.distributed.run --nproc_per_node 2 train.py hardware=h200x2 \
  stage=qlora stage.input=$PTQ hardware.qlora_distributed=fsdp paths.store=/tmp/runs_fsdp $TINY experiment_name=qlora_fsdp_smoke
{ grep -v "torchao\|Enum subclass\|kernels-community\|FutureWarning\|warnings.warn" /tmp/fsdp_smoke.log | tail -40
  for f in /tmp/runs_fsdp/qlora-*/metrics.json; do echo "--- $f"; cat "$f"; done; ls -la /tmp/runs_fsdp/qlora-*/adapter
  cat outputs/qlora_fsdp_smoke/*/results.md; } > "$OUT/fsdp_smoke.txt" 2>&1
budget 410 fsdp2 && run fsdp2 60 python3 -m torch.distributed.run --nproc_per_node 2 $Q --accum 1 --strategy fsdp --out "$OUT/fsdp2.json"
echo "done ${SECONDS}s"
