"""Third-party import noise that says nothing about the user's run."""
import logging
import os
import warnings


def quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torchao (pulled in by gptqmodel) warns about CUDA-only extensions on CPU machines
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
