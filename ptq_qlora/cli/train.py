"""`python train.py [group=option ...] [key=value ...]`: one job of the chain (see conf/config.yaml)."""
import hydra
from omegaconf import DictConfig

from ptq_qlora.cli.job import run_hydra_job
from ptq_qlora.config import CONF_DIR, setup

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_hydra_job(cfg)


if __name__ == "__main__":
    main()
