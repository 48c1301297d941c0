"""Entry point: `python eval.py stage.input=<run or model> task=<task>` (Hydra; see README)."""
from ptq_qlora.cli.evaluate import main

if __name__ == "__main__":
    main()
