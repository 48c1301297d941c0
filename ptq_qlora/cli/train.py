"""`python train.py [group=option ...] [key=value ...]`: one job of the chain (see conf/config.yaml)."""
import hydra
from omegaconf import DictConfig

from ptq_qlora.cli.quiet import quiet_third_party
from ptq_qlora.config import CONF_DIR, setup

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    from ptq_qlora.stages.runner import objective, run_job
    from ptq_qlora.tracking import tracker_for

    with tracker_for(cfg) as tracker:
        summary = run_job(cfg, tracker)
    return objective(summary, cfg)


if __name__ == "__main__":
    main()
