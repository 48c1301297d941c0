"""The body every Hydra entry point runs: quiet imports, W&B on rank 0, the job, the objective."""
from omegaconf import DictConfig

from ptq_qlora.cli.quiet import quiet_third_party


def run_hydra_job(cfg: DictConfig) -> float | None:
    quiet_third_party()
    from ptq_qlora.distributed import main_process_tracker, quiet_other_ranks
    from ptq_qlora.stages.runner import objective, run_job

    quiet_other_ranks()
    with main_process_tracker(cfg) as tracker:  # W&B on rank 0 only (several GPUs)
        summary = run_job(cfg, tracker)
    return objective(summary, cfg)
