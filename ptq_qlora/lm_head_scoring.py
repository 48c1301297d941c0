"""Score only the completion positions in TRL's fused LM head on every device.

TRL's SFTTrainer computes the loss with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that
projects, on CUDA/XPU, only the positions whose label is not -100, and on any other device every
position (a fixed tile shape avoids recompilation on Neuron). On CPU that means the 49k-wide head of
SmolLM2 and its softmax over every prompt token although only the completion is trained: measured
here, one SmolLM2-135M step (8 x 450 tokens, 30 completion tokens a row, bf16 autocast, 2 cores)
takes 34.4 s scoring every position and 14.3 s scoring the completion only, with the same loss and
gradients (the masked positions contribute exact zeros either way). Eager CPU code has no
recompilation to avoid, so the project asks for the compact path there too.
"""
from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)


@contextlib.contextmanager
def completion_positions_only():
    """Within the block, TRL's fused LM head scores only labelled positions on every device.
    If this TRL has no such switch (another version), training runs unchanged and says so."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a dependency
        yield False
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        log.warning("this TRL's fused LM head has no compact switch: every position is scored (slower on CPU)")
        yield False
        return
    trl_utils._use_triton = lambda device: True  # read only for the compact/full choice in add_fused_lm_head
    try:
        yield True
    finally:
        trl_utils._use_triton = original
