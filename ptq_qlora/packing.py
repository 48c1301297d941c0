"""Padding-free training batches: tokenized examples packed best-fit into rows of at most
`pack_length` tokens, each example its own attention block.

Why: the task mix is short and ragged (DialogSum + instruction rows of ~100-1,000 tokens), so a padded
micro-batch spends much of its compute on pad tokens, and a micro-batch of four short rows is too
little work to keep a large GPU busy. Packed rows carry almost no padding and a steady token count.

How the boundaries hold: a packed row has no attention mask; its `position_ids` restart at 0 at every
example. transformers (masking_utils, sdpa/eager/flex attention) turns position_ids that restart into
a block-diagonal causal mask when the attention mask is None and no KV cache is in use (TRL's
SFTTrainer passes use_cache=False), so no token attends across an example boundary. Every example's
first label is -100, so no token is trained to predict the next example's first token. The tail of a
row shorter than the batch's longest is pad tokens that form a block of their own (positions 0..k)
with labels -100. With the same examples, the loss is the mean over the same completion tokens as the
padded path: same loss and gradients up to float summation order (tests/test_fast_path.py).

Not used: TRL's own `padding_free=True` flattens the whole micro-batch into ONE row. Its
`cu_seq_lens` are read only by flash-attention kernels; under sdpa the mask over B*L tokens is dense,
so attention does B times the work of separate rows.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from datasets import Dataset


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins whose total is <= `capacity`
    (a length over `capacity` gets a bin of its own). Deterministic: ties keep index order."""
    if capacity < 1:
        raise ValueError(f"pack_length must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # open bins by free space: parallel sorted lists of (free, bin id)
    free_keys: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            bins.append([i])
            continue
        pos = bisect.bisect_left(free_keys, (n, -1))  # smallest free space that still fits
        if pos < len(free_keys):
            free, b = free_keys.pop(pos)
            bins[b].append(i)
            free -= n
        else:
            b = len(bins)
            bins.append([i])
            free = capacity - n
        if free > 0:
            bisect.insort(free_keys, (free, b))
    return bins


def pack_dataset(dataset: "Dataset", pack_length: int) -> "Dataset":
    """Rows of `input_ids` + `labels` packed into rows of at most `pack_length` tokens, with
    `seq_lengths` (the examples' lengths, in order) and `length` (for the length-grouped sampler)."""
    from datasets import Dataset

    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"packing needs tokenized rows with {sorted(missing)}")
    ids, labels = dataset["input_ids"], dataset["labels"]
    rows = {"input_ids": [], "labels": [], "seq_lengths": [], "length": []}
    for members in best_fit_bins([len(x) for x in ids], pack_length):
        members.sort()  # examples keep their data order inside a row
        rows["input_ids"].append([t for i in members for t in ids[i]])
        rows["labels"].append([t for i in members for t in labels[i]])
        rows["seq_lengths"].append([len(ids[i]) for i in members])
        rows["length"].append(sum(len(ids[i]) for i in members))
    return Dataset.from_dict(rows)


class PackedRowsCollator:
    """Batches packed rows for the padding-free path: `input_ids`, `labels`, `position_ids` (restarting
    at every example), no `attention_mask`. Rows are right-padded (labels -100) to `width` tokens, or to
    the longest row if that is longer: one fixed shape for the packed bins (best fit leaves them ~1%
    short) spares the GPU a new allocation and kernel choice at every step's new width."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, width: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.width = width

    def __call__(self, features: list[dict]) -> dict:
        width = max([len(f["input_ids"]) for f in features] + [self.width or 0])
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            seq_lengths = list(f.get("seq_lengths") or [n])
            if sum(seq_lengths) != n:
                raise ValueError(f"seq_lengths {seq_lengths} do not add up to the row's {n} tokens")
            input_ids[r, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[r, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            if width > n:
                seq_lengths = seq_lengths + [width - n]  # the pad tail: a block of its own
            position_ids[r] = torch.cat([torch.arange(k) for k in seq_lengths])
            starts = torch.tensor([0] + seq_lengths[:-1]).cumsum(0)
            labels[r, starts] = -100  # nothing predicts an example's first token from the previous example
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
