#!/usr/bin/env bash
# The paper's external-data grid (Table 3): 3 models x 2 quantizers x 3 tasks, each job the full
# chain SFT-16bit -> PTQ-{BNB,GPTQ}-4bit -> +QLoRA with Table 4's "Ext" hyperparameters
# (conf/experiment/paper/<model>_<bnb|gptq>_ext.yaml), evaluated at its three points.
#
#   bash experiments/paper_external_grid.sh --dry-run                  # print the commands only
#   bash experiments/paper_external_grid.sh                            # run them here, one job at a time
#   bash experiments/paper_external_grid.sh hydra/launcher=slurm       # each job a SLURM job
#   bash experiments/paper_external_grid.sh --accelerate 8 hardware=a100x8   # each job on 8 local GPUs
#
# Arguments after the options are passed to every train.py call (e.g. data.source=hub,
# logger=wandb, force=true). MODELS / QUANTIZERS / TASKS (space-separated) narrow the grid.
#
# One Hydra multirun per model x quantizer, over the tasks. They run one after the other on
# purpose: the BNB and GPTQ runs of a model share its SFT stage (same lineage), so the second
# reuses it from the run store instead of training it again; within one multirun the tasks have
# different SFT stages, so a parallel launcher (SLURM) can run them at once.
#
# --accelerate N: no multirun; one `accelerate launch --num_processes N train.py ...` per job
# (several GPUs need one process each, which Hydra's launchers do not start).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-"qwen2-7b llama2-7b mistral-7b-v0.3"}
QUANTIZERS=${QUANTIZERS:-"bnb gptq"}
TASKS=${TASKS:-"banking77 bitext dialogsum"}
PYTHON=${PYTHON:-python}

dry_run=0
accelerate=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --accelerate) accelerate="${2:?--accelerate needs the number of GPUs}"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
suffix=""  # the pass-through arguments, shell-quoted
if [[ $# -gt 0 ]]; then suffix=$(printf ' %q' "$@"); fi

commands=()
for model in $MODELS; do
  for quantizer in $QUANTIZERS; do
    experiment="paper/${model}_${quantizer}_ext"
    if [[ ! -f "conf/experiment/${experiment}.yaml" ]]; then
      echo "no experiment config conf/experiment/${experiment}.yaml (MODELS=$MODELS QUANTIZERS=$QUANTIZERS)" >&2
      exit 2
    fi
    if [[ "$accelerate" -gt 0 ]]; then
      for task in $TASKS; do
        commands+=("accelerate launch --num_processes ${accelerate} train.py experiment=${experiment} task=${task}${suffix}")
      done
    else
      tasks_csv=$(echo $TASKS | tr ' ' ',')
      commands+=("${PYTHON} train.py -m experiment=${experiment} task=${tasks_csv}${suffix}")
    fi
  done
done

for command in "${commands[@]}"; do
  if [[ "$dry_run" -eq 1 ]]; then
    echo "$command"
  else
    echo ">>> $command" >&2
    eval "$command"
  fi
done
