"""Row checks: malformed rows and unknown labels are skipped and counted (never repaired or
mapped to a near label), and the paper's token-length filter (section 4.2: 3200 in / 800 out)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

# Per split, only the first few skipped rows are logged one by one; the rest only in the totals.
_LOG_FIRST = 3


@dataclass
class SkipCounts:
    malformed: Counter = field(default_factory=Counter)  # unreadable line, missing or empty field
    unknown_label: Counter = field(default_factory=Counter)  # label outside the task's label set

    def skip(self, kind: str, where: str, row_ref: Any, reason: str) -> None:
        counter = getattr(self, kind)
        counter[where] += 1
        if counter[where] <= _LOG_FIRST:
            log.warning("%s row %s skipped: %s", where, row_ref, reason)


def text_field(row: dict, name: str) -> Optional[str]:
    """The stripped string in `row[name]`, or None when it is missing, not a string, or blank."""
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def label_name(value: Any, names: Sequence[str]) -> Optional[str]:
    """Canonical label for an id (ClassLabel index) or a name; None when outside the set."""
    if isinstance(value, bool):  # bool is an int subclass; True is not label 1
        return None
    if isinstance(value, int):
        return names[value] if 0 <= value < len(names) else None
    if isinstance(value, str) and value in names:
        return value
    return None


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    # Batched call of a Hugging Face tokenizer; special tokens are counted where the chat
    # template is rendered, not here.
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def filter_by_length(
    rows: list[dict], tokenizer, max_prompt_tokens: int, max_completion_tokens: int, split: str
) -> tuple[list[dict], int]:
    """Drop rows whose prompt or completion is longer than the limits; returns (kept, n_dropped)."""
    prompt_lens = _token_counts(tokenizer, [r["prompt"] for r in rows])
    completion_lens = _token_counts(tokenizer, [r["completion"] for r in rows])
    kept = [
        r for r, p, c in zip(rows, prompt_lens, completion_lens)
        if p <= max_prompt_tokens and c <= max_completion_tokens
    ]
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning("%s: %d of %d rows dropped by the length filter (prompt > %d or completion > %d tokens)",
                    split, dropped, len(rows), max_prompt_tokens, max_completion_tokens)
    return kept, dropped
