"""Map a model's free-text answer to one label of a closed label set, or to None.

The rules, in order (each on normalised text, see `normalise`):
  1. the whole answer equals a label;
  2. its first non-empty line equals a label;
  3. the longest label that occurs in the answer as whole words (ties: the earliest occurrence).
Nothing else: a label that does not occur in the text is never guessed, so an answer that names no
label is None and counts as wrong.
"""
from __future__ import annotations

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


def _exact(text: str, index: dict[str, str]) -> str | None:
    """The label that `text` is, as it stands or after a "Label:"-style prefix (tried second, so a
    label that itself starts with such a word is not cut)."""
    for candidate in (text, _PREFIX.sub("", text, count=1)):
        key = normalise(candidate)
        if key in index:
            return index[key]
    return None


def _clean(text: str) -> str:
    text = _END_MARKERS.split(text, maxsplit=1)[0]
    return _OTHER_MARKERS.sub(" ", text)


def _label_index(labels: list[str]) -> dict[str, str]:
    index: dict[str, str] = {}
    for label in labels:
        key = normalise(label)
        if not key:
            raise ValueError(f"label {label!r} is empty after normalisation")
        if key in index and index[key] != label:
            raise ValueError(f"labels {index[key]!r} and {label!r} are the same after normalisation")
        index[key] = label
    return index


def _whole_word_matches(text: str, index: dict[str, str]) -> list[tuple[str, int]]:
    """(normalised label, first start position) for every label occurring as whole words in text."""
    found = []
    for key in index:
        match = re.search(r"(?<![a-z0-9])" + re.escape(key) + r"(?![a-z0-9])", text)
        if match:
            found.append((key, match.start()))
    return found


def parse_label(text: str, labels: list[str]) -> str | None:
    """Return the label (as spelled in `labels`) that `text` names, or None when it names none."""
    index = _label_index(labels)
    text = _clean(text or "")

    label = _exact(text, index)
    if label is not None:
        return label

    lines = [line for line in text.splitlines() if line.strip(_EDGE_CHARS)]
    if lines:
        label = _exact(lines[0], index)
        if label is not None:
            return label

    # Only separators are normalised here (no edge stripping), so positions refer to one string.
    searchable = _SEPARATORS.sub(" ", text.lower())
    found = _whole_word_matches(searchable, index)
    if not found:
        return None
    # Longest first (so "virtual card not working" beats "card not working"), then earliest.
    key, _ = min(found, key=lambda item: (-len(item[0]), item[1]))
    return index[key]
