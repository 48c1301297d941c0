"""AlignScore (Zha et al., ACL 2023): factual consistency of a claim (a generated summary) with its
context (the dialogue), the paper's AlScore column. Inference only, from the released checkpoints.

Why not a package: the original (yuh-zha/AlignScore) is not on PyPI, and the one PyPI
distribution, alignscore-SpeedOfMagic 0.1.4 (a fork of it), requires transformers<5, numpy<2 and
protobuf<=3.20.3 and pulls pytorch-lightning, spacy and tensorboard: it cannot be installed beside
this project's transformers 5 / numpy 2. So this module loads the same checkpoints into
transformers' RoBERTa itself and repeats the reference's "nli_sp" scoring
(alignscore/inference.py, Inferencer.inference_per_example; alignscore/model.py, BERTAlignModel):

- Model: `RobertaModel` (with its pooler) and three linear heads on `pooler_output`, bin (2), tri (3)
  and reg (1). Weights come from the Lightning checkpoint's `state_dict`: keys `base_model.*`,
  `bin_layer.*`, `tri_layer.*` and `reg_layer.*`. The MLM head (`mlm_head.*`, training only) and
  the `position_ids` buffer that older transformers saved are not needed and are skipped. The
  backbone's config and tokenizer come from the name the checkpoint records
  (`hyper_parameters["model"]`: roberta-large for AlignScore-large, roberta-base for -base), from
  the Hub or the local HF cache, or from `backbone` when given.
- Context: split into sentences (nltk Punkt when its model is installed, else a regex splitter,
  as in ptq_qlora.metrics.rouge), regrouped into chunks: n = words // 350 + 1 chunks wanted,
  max(sentences // n, 1) sentences per chunk (as the reference, this can give more than n chunks).
- Claim: split into sentences. Every (chunk, claim sentence) pair is one input
  `<s> chunk </s></s> sentence </s>`, the chunk truncated first (the sentence too when it alone
  is over the length limit); its score is the tri head's softmax probability of class 0 (aligned).
- Score of a claim: the mean over its sentences of the max over the chunks, in [0, 1].

Differences that do not change a score: batches are padded to their longest pair (the reference
pads to 512; padded positions are masked), pairs are batched across examples, sorted by length,
and identical pairs (DialogSum's test set repeats each dialogue for its three references) are
scored once. One that does: a claim without any sentence (an empty prediction) scores 0.0, where
the reference fails; `score_predictions` counts them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ptq_qlora.metrics.rouge import sentence_splitter

log = logging.getLogger(__name__)

MODE = "nli_sp"  # the reference's mode for summaries: 3-way head, chunked context, split claim
CHUNK_WORDS = 350
ALIGNED = 0  # the tri head's class for "aligned" (entailment)
_HEADS = {"bin_layer": 2, "tri_layer": 3, "reg_layer": 1}
_USED_PREFIXES = ("base_model.", *(f"{head}." for head in _HEADS))
_OLD_BUFFERS = ("base_model.embeddings.position_ids",)  # saved by transformers < 4.31, not a weight
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_FINGERPRINT_BYTES = 1 << 20


# ------------------------------------------------------------------------------- text handling
def sentences(text: str) -> list[str]:
    """The reference's `sent_tokenize(text)`: Punkt when installed, else a regex split after . ! ?"""
    if sentence_splitter() == "nltk-punkt":
        import nltk

        return nltk.tokenize.sent_tokenize(text)
    return [part for part in _SENTENCE_END.split(text.strip()) if part]


def context_chunks(context: str) -> list[str]:
    """The context's sentences regrouped into chunks of about CHUNK_WORDS words (the reference's rule)."""
    parts = sentences(context) or [""]
    wanted = len(context.strip().split()) // CHUNK_WORDS + 1
    per_chunk = max(len(parts) // wanted, 1)
    return [" ".join(parts[i:i + per_chunk]) for i in range(0, len(parts), per_chunk)]


def context_from_prompt(template: str, prompt: str) -> str:
    """The task input a prompt was made from (`template.format(text=...)`), i.e. the dialogue."""
    literals, fields = [], []
    for literal, field_name, _, _ in string.Formatter().parse(template):
        literals.append(literal)
        if field_name is not None:
            fields.append(field_name)
    if fields != ["text"]:
        raise ValueError(f"AlignScore needs the task input: the prompt template must contain {{text}} once "
                         f"and no other field (has {fields})")
    prefix, suffix = literals[0], "".join(literals[1:])
    if not (prompt.startswith(prefix) and prompt.endswith(suffix) and len(prompt) >= len(prefix) + len(suffix)):
        raise ValueError("AlignScore: a prompt does not match task.prompt_template, so its input text cannot be recovered")
    return prompt[len(prefix):len(prompt) - len(suffix)]


# ------------------------------------------------------------------------------- checkpoint
def check_checkpoint(path: str | os.PathLike) -> Path:
    checkpoint = Path(path).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"AlignScore checkpoint {str(path)!r} does not exist (task.alignscore.checkpoint); "
                                "download AlignScore-large.ckpt from the Hub repo yzha/AlignScore, or set it to null")
    return checkpoint


def checkpoint_identity(path: str | os.PathLike) -> dict:
    """What tells checkpoints apart without the machine's path: the file name, its size and a
    hash of its first and last MiB (hashing all 1.4 GB of AlignScore-large on every eval is slow)."""
    checkpoint = check_checkpoint(path)
    size = checkpoint.stat().st_size
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read())
    return {"name": checkpoint.name, "bytes": size, "sha256_ends": digest.hexdigest()[:16]}


class _StandIn(dict):
    """Stands for a class of a library that is not installed (e.g. Lightning's AttributeDict in
    `hyper_parameters`): keeps what a dict would, so the checkpoint's tensors still load."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _StandIn


class _LenientPickle:
    Unpickler = _LenientUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The Lightning checkpoint as a dict. Tensors-and-plain-types first (`weights_only`); if it
    holds other objects (Lightning's own classes, saved by the training script), a full unpickle in
    which classes of libraries not installed here become plain dicts."""
    checkpoint = check_checkpoint(path)
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        log.warning("AlignScore checkpoint %s holds more than tensors (%s); loading it in full, which runs "
                    "its pickled code: use only checkpoints you trust", checkpoint, str(err).splitlines()[0])
    return torch.load(checkpoint, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)


# ------------------------------------------------------------------------------- model
class AlignModel(nn.Module):
    """BERTAlignModel's inference part: the backbone and its three heads, same attribute names as
    the checkpoint's keys."""

    def __init__(self, config):
        super().__init__()
        from transformers import RobertaModel

        self.base_model = RobertaModel(config, add_pooling_layer=True)
        for head, width in _HEADS.items():
            setattr(self, head, nn.Linear(config.hidden_size, width))

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """P(aligned) of each pair, from the tri head (dropout is off at inference)."""
        pooled = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).pooler_output
        return self.tri_layer(pooled).softmax(dim=-1)[:, ALIGNED]


def _load_backbone(name: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoConfig.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except OSError as err:
        offline = " with HF_HUB_OFFLINE set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"AlignScore backbone {name!r} could not be loaded{offline}: its config and tokenizer come "
                      f"from the Hugging Face Hub or the local HF cache (download it once with network access) "
                      f"or from a local folder set as task.alignscore.backbone ({reason})") from err


@dataclass
class AlignScorer:
    model: AlignModel
    tokenizer: object
    max_length: int
    batch_size: int
    checkpoint: dict  # checkpoint_identity
    backbone: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "AlignScorer":
        self.model.to(device)
        return self

    def describe(self) -> dict:
        return {"checkpoint": self.checkpoint, "backbone": self.backbone, "mode": MODE,
                "max_length": self.max_length, "sentence_splitter": sentence_splitter()}

    def _encode(self, chunk: str, sentence: str) -> dict:
        try:
            return self.tokenizer(chunk, sentence, truncation="only_first", max_length=self.max_length)
        except Exception:  # the sentence alone is too long for only_first: the reference truncates both then
            return self.tokenizer(chunk, sentence, truncation="longest_first", max_length=self.max_length)

    @torch.no_grad()
    def pair_probabilities(self, pairs: list[tuple[str, str]]) -> list[float]:
        """P(aligned) of each (context chunk, claim sentence) pair, in the order given."""
        encoded = [self._encode(chunk, sentence) for chunk, sentence in pairs]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
        out = [0.0] * len(encoded)
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([encoded[i] for i in index], return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()
                     if k in ("input_ids", "attention_mask", "token_type_ids")}
            for i, p in zip(index, self.model(**batch).float().cpu().tolist()):
                out[i] = p
        return out

    def score(self, contexts: list[str], claims: list[str]) -> list[float]:
        """AlignScore (nli_sp) of each claim against its context, in [0, 1]."""
        if len(contexts) != len(claims):
            raise ValueError(f"{len(contexts)} contexts but {len(claims)} claims")
        plans, pair_index = [], {}
        for context, claim in zip(contexts, claims):
            chunks, claim_sentences = context_chunks(context), sentences(claim)
            plans.append((chunks, claim_sentences))
            for chunk in chunks:
                for sentence in claim_sentences:
                    pair_index.setdefault((chunk, sentence), len(pair_index))
        probabilities = self.pair_probabilities(list(pair_index))
        scores = []
        for chunks, claim_sentences in plans:
            if not claim_sentences:
                scores.append(0.0)
                continue
            grid = torch.tensor([[probabilities[pair_index[(c, s)]] for s in claim_sentences] for c in chunks])
            scores.append(grid.max(dim=0).values.mean().item())
        return scores


def load_alignscore(checkpoint: str | os.PathLike, backbone: str | None = None, batch_size: int = 32,
                    device: str | torch.device = "cpu") -> AlignScorer:
    """An AlignScorer from an AlignScore Lightning checkpoint (AlignScore-base.ckpt / -large.ckpt)."""
    path = check_checkpoint(checkpoint)
    raw = read_checkpoint(path)
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("base_model.") for k in state):
        raise ValueError(f"{path} is not an AlignScore checkpoint (no 'state_dict' with 'base_model.*' weights)")
    hparams = raw.get("hyper_parameters") or {}
    backbone = backbone or (hparams.get("model") if isinstance(hparams, dict) else None)
    if not backbone:
        raise ValueError(f"{path} does not name its backbone (hyper_parameters['model']); "
                         "set task.alignscore.backbone (roberta-large for AlignScore-large, roberta-base for -base)")
    config, tokenizer = _load_backbone(str(backbone))
    if config.model_type != "roberta":
        raise ValueError(f"AlignScore backbone {backbone!r} is a {config.model_type!r} model; this loader reads the "
                         "released RoBERTa checkpoints (roberta-base / roberta-large)")
    model = AlignModel(config)
    weights = {k: v for k, v in state.items() if k.startswith(_USED_PREFIXES) and k not in _OLD_BUFFERS}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{path} does not fit backbone {backbone!r} ({detail})") from err
    # RoBERTa's positions start after the padding index: that many fewer tokens than position slots
    limit = config.max_position_embeddings - config.pad_token_id - 1
    max_length = min(int(tokenizer.model_max_length or limit), limit)
    model.eval().to(device)
    return AlignScorer(model, tokenizer, max_length, int(batch_size), checkpoint_identity(path), str(backbone))


# ------------------------------------------------------------------------------- evaluation
def settings_of(task_cfg) -> dict | None:
    """task.alignscore as a dict when a checkpoint is set (checked: the file exists and the task
    generates text), else None."""
    node = task_cfg.get("alignscore") if hasattr(task_cfg, "get") else getattr(task_cfg, "alignscore", None)
    if node is None or node.get("checkpoint") in (None, ""):
        return None
    if task_cfg.kind != "generation":
        raise ValueError(f"task.alignscore.checkpoint is set but task {task_cfg.name!r} is {task_cfg.kind}: "
                         "AlignScore scores generated text")
    check_checkpoint(node["checkpoint"])
    return {k: node.get(k) for k in ("checkpoint", "backbone", "batch_size", "device")}


def score_predictions(scorer: AlignScorer, contexts: list[str], predictions: list[str]) -> tuple[dict, list[float]]:
    """(summary, per-example scores): summary has `alignscore` (the mean) and `alignscore_setup`."""
    scores = scorer.score(contexts, predictions)
    empty = sum(not sentences(p) for p in predictions)
    setup = {**scorer.describe(), "n": len(scores), "empty_predictions_scored_0": empty}
    return {"alignscore": sum(scores) / len(scores) if scores else None, "alignscore_setup": setup}, scores
