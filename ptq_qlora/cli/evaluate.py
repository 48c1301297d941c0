"""`python eval.py stage.input=<run folder | model folder | Hub id> task=<task>`: evaluate any
model on any task (conf/eval.yaml). `python eval.py report ...`: reports (ptq_qlora.report.cli)."""
import sys

import hydra
from omegaconf import DictConfig

from ptq_qlora.cli.quiet import quiet_third_party
from ptq_qlora.config import CONF_DIR, setup

setup()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _evaluate(cfg: DictConfig) -> float | None:
    quiet_third_party()
    from ptq_qlora.distributed import main_process_tracker, quiet_other_ranks
    from ptq_qlora.stages.runner import objective, run_job

    quiet_other_ranks()
    with main_process_tracker(cfg) as tracker:  # W&B on rank 0 only (several GPUs)
        summary = run_job(cfg, tracker)
    return objective(summary, cfg)


def main():
    """`eval.py report ...` goes to the report CLI (argparse) before Hydra sees the arguments."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from ptq_qlora.report.cli import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    return _evaluate()


if __name__ == "__main__":
    main()
