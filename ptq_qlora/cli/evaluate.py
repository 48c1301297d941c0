"""`python eval.py stage.input=<run folder | model folder | Hub id> task=<task>`: evaluate any
model on any task (conf/eval.yaml). `python eval.py report ...`: reports (ptq_qlora.report.cli)."""
import sys

import hydra
from omegaconf import DictConfig

from ptq_qlora.cli.job import run_hydra_job
from ptq_qlora.config import CONF_DIR, setup

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _evaluate(cfg: DictConfig) -> float | None:
    return run_hydra_job(cfg)


def main():
    """`eval.py report ...` goes to the report CLI (argparse) before Hydra sees the arguments."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from ptq_qlora.report.cli import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    return _evaluate()


if __name__ == "__main__":
    main()
