"""Entry point: `python train.py` (Hydra; see README and conf/config.yaml)."""
from ptq_qlora.cli.train import main

if __name__ == "__main__":
    main()
