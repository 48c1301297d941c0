"""`python train.py [group=option ...] [key=value ...]`: one job of the chain (see conf/config.yaml)."""
import hydra
from omegaconf import DictConfig

from ptq_qlora.cli.quiet import quiet_third_party
from ptq_qlora.config import CONF_DIR, setup

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    from ptq_qlora.distributed import main_process_tracker, quiet_other_ranks
    from ptq_qlora.stages.runner import objective, run_job

    quiet_other_ranks()
    with main_process_tracker(cfg) as tracker:  # W&B on rank 0 only (several GPUs)
        summary = run_job(cfg, tracker)
    return objective(summary, cfg)


if __name__ == "__main__":
    main()
