"""Map a model's free-text answer to one label of a closed label set, or to None.

The rules, in order (each on normalised text, see `normalise`):
  1. the whole answer equals a label;
  2. its first non-empty line equals a label;
  3. the longest label that occurs as whole words in the first line (ties: the earliest occurrence);
  4. the same over the whole answer.
Nothing else: a label that does not occur in the text is never guessed, so an answer that names no
label is None and counts as wrong.
"""
from __future__ import annotations

import functools
import re

# Chat end markers: whatever follows one is the model running past its turn, not its answer.
_END_MARKERS = re.compile(r"<\|(?:im_end|endoftext|eot_id|end|eom_id)\|>|</s>|<end_of_turn>|<eos>", re.I)
# Any other leftover special-token-looking marker (<|im_start|>, <s>, [INST] ...) carries no label.
_OTHER_MARKERS = re.compile(r"<\|[^<>|]*\|>|<s>|\[/?INST\]", re.I)
# "Label: x", "Intent - x", "The category is x", "**Answer**: x" ...
_PREFIX = re.compile(
    r"^\W*(?:the\s+)?(?:predicted\s+)?(?:label|intent|category|class|classification|answer|output)\b"
    r"\W*(?:is\b)?\s*[:=\-]*\s*",
    re.I,
)
_EDGE_CHARS = " \t\r\n\"'`*.,;:!?()[]{}<>«»“”‘’"
_SEPARATORS = re.compile(r"[\s_\-]+")


def normalise(text: str) -> str:
    """Lower-case, `_`/`-`/whitespace runs -> one space, surrounding quotes/punctuation removed."""
    text = _SEPARATORS.sub(" ", text.lower())
    return text.strip(_EDGE_CHARS).strip()


def _clean(text: str) -> str:
    text = _END_MARKERS.split(text, maxsplit=1)[0]
    return _OTHER_MARKERS.sub(" ", text)


@functools.lru_cache(maxsize=16)
def _label_index(labels: tuple[str, ...]) -> dict[str, tuple[str, re.Pattern]]:
    """normalised label -> (label as given, compiled whole-word pattern); cached per label set
    because a test split parses thousands of answers against the same labels."""
    index: dict[str, tuple[str, re.Pattern]] = {}
    for label in labels:
        key = normalise(label)
        if not key:
            raise ValueError(f"label {label!r} is empty after normalisation")
        if key in index and index[key][0] != label:
            raise ValueError(f"labels {index[key][0]!r} and {label!r} are the same after normalisation")
        index[key] = (label, re.compile(r"(?<![a-z0-9])" + re.escape(key) + r"(?![a-z0-9])"))
    return index


def _exact(text: str, index: dict) -> str | None:
    """The label that `text` is, as it stands or after a "Label:"-style prefix (tried second, so a
    label that itself starts with such a word is not cut)."""
    for candidate in (text, _PREFIX.sub("", text, count=1)):
        key = normalise(candidate)
        if key in index:
            return index[key][0]
    return None


def _longest_mentioned(text: str, index: dict) -> str | None:
    """The longest label occurring as whole words in `text` (ties: the earliest occurrence)."""
    searchable = _SEPARATORS.sub(" ", text.lower())  # separators only, so no label is cut
    found = []
    for key, (label, pattern) in index.items():
        match = pattern.search(searchable)
        if match:
            found.append((-len(key), match.start(), label))
    return min(found)[2] if found else None


def parse_label(text: str, labels: list[str]) -> str | None:
    """Return the label (as spelled in `labels`) that `text` names, or None when it names none."""
    index = _label_index(tuple(labels))
    text = _clean(text or "")
    lines = [line for line in text.splitlines() if line.strip(_EDGE_CHARS)]
    first_line = lines[0] if lines else ""
    return (
        _exact(text, index)
        or _exact(first_line, index)
        # The first line is where a label-first answer puts it; labels named in a later explanation
        # must not outrank it just by being longer.
        or _longest_mentioned(first_line, index)
        or _longest_mentioned(text, index)
    )
