"""Prompt text from the templates in `conf/task/*.yaml` (plain user text, no chat template).

Classification prompts list the whole label set in an order shuffled per example (paper 4.1.2:
"we randomly shuffle the intents in the task prompts"), so the model cannot learn a position.
The shuffle is seeded by (data seed, example id): the same example always gets the same order,
whatever else is in the split and in whatever process it is built.
"""
from __future__ import annotations

import random
from string import Formatter
from typing import Sequence


def check_template(template: str, kind: str, task: str) -> None:
    """Fail at load time, not mid-run, on a template that misses a placeholder or uses one this
    kind of task does not fill (e.g. `{labels}` in a generation task)."""
    filled = ["text"] + (["labels"] if kind == "classification" else [])
    try:
        used = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError as err:  # a lone brace
        raise ValueError(f"task {task!r}: prompt_template is not a valid str.format template ({err}); "
                         "write literal braces as {{ }}") from None
    missing = [f"{{{p}}}" for p in filled if p not in used]
    if missing:
        raise ValueError(f"task {task!r}: prompt_template lacks {', '.join(missing)}")
    unknown = sorted(f"{{{p}}}" for p in used - set(filled))
    if unknown:
        raise ValueError(f"task {task!r}: prompt_template uses {', '.join(unknown)}, which a {kind} task does "
                         f"not fill (it fills {', '.join('{' + p + '}' for p in filled)}); write literal "
                         "braces as {{ }}")


def shuffled_labels(labels: Sequence[str], seed: int, example_id: str) -> list[str]:
    order = list(labels)
    # A str seed is hashed with SHA-512 by `random`, so it does not depend on PYTHONHASHSEED.
    random.Random(f"{seed}:{example_id}").shuffle(order)
    return order


def classification_prompt(
    template: str, text: str, labels: Sequence[str], *, seed: int, example_id: str, separator: str = ", "
) -> str:
    return template.format(text=text, labels=separator.join(shuffled_labels(labels, seed, example_id)))


def generation_prompt(template: str, text: str) -> str:
    return template.format(text=text)


def general_prompt(instruction: str, input_text: str, template: str, template_with_input: str) -> str:
    """Alpaca-style rows: the instruction, plus its input when it has one."""
    if input_text.strip():
        return template_with_input.format(instruction=instruction, input=input_text)
    return template.format(instruction=instruction)
