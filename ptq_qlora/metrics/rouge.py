"""ROUGE-1/2/L/Lsum F-measures (Google's `rouge_score`, Porter stemmer), per example and mean.

rougeLsum scores a summary sentence by sentence: the texts must arrive with one sentence per line.
Sentence splitting uses nltk's Punkt (`sent_tokenize`) when its model is installed locally, and
otherwise a regex splitter (after `.`, `!` or `?` followed by whitespace). Nothing is ever downloaded:
`sentence_splitter()` says which one ran, so results can record it. rouge1/2/L do not see newlines
(the tokenizer treats them as spaces), so splitting changes rougeLsum only.

Note for comparison with the paper: its DialogSum RL and RLsum agree to ~1e-4, which is what
unsplit text gives (HF `evaluate`'s default). `split_sentences=False` reproduces that convention.
"""
from __future__ import annotations

import functools
import re

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=1)
def _punkt_available() -> bool:
    try:
        import nltk

        # sent_tokenize raises LookupError (it does not download) when the model is missing.
        nltk.tokenize.sent_tokenize("One. Two.")
        return True
    except LookupError:
        return False


def sentence_splitter() -> str:
    """Name of the sentence splitter rougeLsum uses here: "nltk-punkt" or "regex"."""
    return "nltk-punkt" if _punkt_available() else "regex"


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; existing line breaks are kept as sentence breaks."""
    sentences: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if _punkt_available():
            import nltk

            sentences.extend(nltk.tokenize.sent_tokenize(line))
        else:
            sentences.extend(part for part in _SENTENCE_END.split(line.strip()) if part)
    return sentences


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_metrics(
    predictions: list[str],
    references: list[str | list[str]],
    split_sentences_for_lsum: bool = True,
) -> tuple[dict, list[dict]]:
    """Per-example ROUGE F-measures and their means (summary also holds `n`).

    A reference may be a list of strings (DialogSum's test split has three human summaries per
    dialogue): each score is then the best over them, per ROUGE type (`RougeScorer.score_multi`).
    `split_sentences_for_lsum=False` scores rougeLsum on the text as given (then rougeLsum ~ rougeL).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")

    def prepare(text: str) -> str:
        return "\n".join(split_sentences(text)) if split_sentences_for_lsum else text

    scorer = _scorer()
    per_example = []
    for prediction, reference in zip(predictions, references):
        if isinstance(reference, str):
            scores = scorer.score(prepare(reference), prepare(prediction))  # (target, prediction)
        else:
            scores = scorer.score_multi([prepare(r) for r in reference], prepare(prediction))
        per_example.append({name: float(scores[name].fmeasure) for name in ROUGE_TYPES})
    summary = {name: sum(row[name] for row in per_example) / len(per_example) for name in ROUGE_TYPES}
    summary["n"] = len(per_example)
    return summary, per_example
