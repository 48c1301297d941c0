#!/usr/bin/env bash
# The 2-GPU proof in one device call (nvidia-h200-x2): 1 vs 2 GPUs full SFT (FSDP2) of a 16-layer
# 7B-width model, 2 GPUs of the full 32-layer 7B shape with a consolidated save + reload, the real
# `train.py` under torchrun on a tiny model (shared output folder, rank-0 run store, sharded eval),
# and a 1-GPU attempt at the full 7B. Results land in $OUT (device tool) or ./bench_out.
# Carried: .whl (transformers 5.23, trl, datasets, hydra, ...), .site/data (bitext + alpaca mirrors).
set -u
OUT=${OUT:-$PWD/bench_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m;
  python3 -c 'import torch,transformers,accelerate;print(torch.__version__,transformers.__version__,accelerate.__version__,torch.cuda.device_count())'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
B="benchmarks/fsdp_sft.py --hardware h200x2 --batch 4 --seq 2048 --steps 8"
run() { local name=$1 cap=$2; shift 2; echo "=== $name: $*"; local t0=$SECONDS
  timeout "$cap" "$@" > "/tmp/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS-t0))s"
  grep -E '^\{"world_size"|Error|error:|OutOfMemory' "/tmp/$name.log" | grep -v Warning | tail -4; }
run sft16_1gpu 100 env CUDA_VISIBLE_DEVICES=0 python3 -m torch.distributed.run --nproc_per_node 1 $B --num-processes 1 --layers 16 --accum 2 --out "$OUT/sft16_1gpu.json"
run sft16_2gpu 100 python3 -m torch.distributed.run --nproc_per_node 2 $B --layers 16 --accum 1 --out "$OUT/sft16_2gpu.json"
run sft32_2gpu 170 python3 -m torch.distributed.run --nproc_per_node 2 $B --layers 32 --accum 1 --save /tmp/sft7b --out "$OUT/sft32_2gpu.json"
rm -rf /tmp/sft7b /tmp/sft7b.trainer
# the real entry point: tiny model, FSDP2 SFT + sharded eval on 2 GPUs, one output folder, one store
export PTQ_QLORA_DATA=$PWD/.site/data PTQ_QLORA_STORE=/tmp/runs
run project_smoke 100 python3 -m torch.distributed.run --nproc_per_node 2 train.py hardware=h200x2 model=tiny-random data=cpu \
  data.max_train=64 data.max_dev=4 data.max_test=16 sft.epochs=1 hardware.train_batch_size=4 \
  hardware.eval_batch_size=8 eval.max_new_tokens=8 experiment_name=gpu_smoke
{ tail -60 /tmp/project_smoke.log; echo "--- outputs:"; find outputs/gpu_smoke -maxdepth 3 | sort;
  echo "--- store:"; find /tmp/runs -maxdepth 3 | sort; cat /tmp/runs/sft-*/metrics.json;
  cat /tmp/runs/sft-*/model/config.json; } > "$OUT/project_smoke.txt" 2>&1
run sft32_1gpu 110 env CUDA_VISIBLE_DEVICES=0 python3 -m torch.distributed.run --nproc_per_node 1 $B --num-processes 1 --layers 32 --accum 2 --steps 6 --out "$OUT/sft32_1gpu.json"
for n in sft16_1gpu sft16_2gpu sft32_2gpu sft32_1gpu; do grep -v "torchao\|Enum subclass\|kernels-community" /tmp/$n.log | tail -25; done > "$OUT/logs_tail.txt" 2>&1
echo done
