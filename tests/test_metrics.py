"""Label parsing, classification metrics, ROUGE and the paired Wilcoxon test, checked by hand and
against the libraries called directly."""
import random

import pytest
from rouge_score import rouge_scorer
from scipy.stats import wilcoxon
from sklearn.metrics import precision_recall_fscore_support

from ptq_qlora.metrics import compute_metrics, paired_wilcoxon, parse_label
from ptq_qlora.metrics.classification import classification_metrics
from ptq_qlora.metrics.rouge import rouge_metrics, sentence_splitter, split_sentences

# Real banking77 names, including the odd ones ('?', a capital) and substring pairs.
BANKING = [
    "card_arrival", "card_not_working", "virtual_card_not_working", "exchange_rate",
    "card_payment_wrong_exchange_rate", "reverted_card_payment?", "Refund_not_showing_up",
]


# ---------------------------------------------------------------- parse_label
@pytest.mark.parametrize(
    "text, expected",
    [
        ("card_arrival", "card_arrival"),  # exact
        ("Card Arrival", "card_arrival"),  # case + space for underscore
        ("CARD-ARRIVAL", "card_arrival"),  # hyphen for underscore
        ("  'card_arrival'.  ", "card_arrival"),  # surrounding quotes/punctuation
        ("Intent: card_arrival", "card_arrival"),  # prefix
        ("**Label**: exchange rate", "exchange_rate"),
        ("The category is exchange_rate.", "exchange_rate"),
        ("card_arrival<|im_end|>\n<|im_start|>user\nexchange_rate", "card_arrival"),  # chat end token
        ("reverted card payment", "reverted_card_payment?"),  # label's own '?' is edge punctuation
        ("refund not showing up!", "Refund_not_showing_up"),  # label spelled as in the label set
        ("card_arrival\nBecause the customer asks where the card is.", "card_arrival"),  # first line
        ("I think this is about card_arrival, clearly.", "card_arrival"),  # embedded in a sentence
    ],
)
def test_parse_label_hand_cases(text, expected):
    assert parse_label(text, BANKING) == expected


def test_parse_label_prefers_longest_then_earliest():
    # "card not working" occurs inside "virtual card not working": the longer label wins.
    assert parse_label("It's virtual_card_not_working.", BANKING) == "virtual_card_not_working"
    assert parse_label("card_not_working or virtual card not working", BANKING) == "virtual_card_not_working"
    assert parse_label("wrong rate: card payment wrong exchange rate", BANKING) == (
        "card_payment_wrong_exchange_rate"
    )
    # Two labels of equal length: the one mentioned first.
    labels = ["age_limit", "card_swap"]  # both 9 characters
    assert len(labels[0]) == len(labels[1])
    assert parse_label("maybe card_swap, or age_limit", labels) == "card_swap"
    assert parse_label("maybe age_limit, or card_swap", labels) == "age_limit"


def test_parse_label_first_line_outranks_later_mentions():
    text = "The intent is card arrival.\nIt is not about the exchange rate."
    assert parse_label(text, BANKING) == "card_arrival"  # although "exchange rate" is longer


def test_parse_label_substring_label_pairs():
    labels = ["card_arrival", "card_arrival_late"]
    assert parse_label("card_arrival_late", labels) == "card_arrival_late"
    assert parse_label("card_arrival", labels) == "card_arrival"
    assert parse_label("The answer: card arrival late", labels) == "card_arrival_late"
    assert parse_label("it is card arrival, not late", labels) == "card_arrival"
    # Whole words only: a label inside a longer word does not count.
    assert parse_label("cardarrival", labels) is None
    assert parse_label("card_arrivals", labels) is None


def test_parse_label_never_guesses():
    assert parse_label("I cannot tell.", BANKING) is None
    assert parse_label("", BANKING) is None
    assert parse_label("label", BANKING) is None
    assert parse_label("<|im_end|>card_arrival", BANKING) is None  # after the end token is not an answer


def test_parse_label_rejects_colliding_labels():
    with pytest.raises(ValueError, match="same after normalisation"):
        parse_label("x", ["card_arrival", "Card-Arrival"])


# ---------------------------------------------------------------- classification
LABELS = ["a", "b", "c"]
REFS = ["a", "a", "b", "c", "c"]
PREDS = ["a", "Label: b", "b", "no idea", "it is c"]


def test_classification_hand_computed():
    summary, per_example = classification_metrics(PREDS, REFS, LABELS)
    assert [row["parsed"] for row in per_example] == ["a", "b", "b", None, "c"]
    assert [row["correct"] for row in per_example] == [1, 0, 1, 0, 1]
    assert summary["n"] == 5 and summary["n_unparsed"] == 1
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["recall"] == pytest.approx(3 / 5)  # 3 correct of 5 gold
    assert summary["precision"] == pytest.approx(3 / 4)  # 3 correct of 4 predicted labels
    assert summary["f1_micro"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))


def test_classification_matches_sklearn_directly():
    rng = random.Random(0)
    labels = [f"intent_{i}" for i in range(7)]
    refs = [rng.choice(labels) for _ in range(200)]
    preds = [rng.choice(labels + ["???"]) if rng.random() < 0.5 else ref for ref in refs]
    summary, per_example = classification_metrics(preds, refs, labels)
    y_pred = [p if p in labels else "__none__" for p in preds]
    p, r, f, _ = precision_recall_fscore_support(refs, y_pred, labels=labels, average="micro", zero_division=0)
    assert (summary["precision"], summary["recall"], summary["f1_micro"]) == pytest.approx((p, r, f))
    assert summary["n_unparsed"] == sum(p == "???" for p in preds) > 0


def test_classification_all_parsed_gives_p_equal_r_equal_f1():
    summary, _ = classification_metrics(["a", "b", "b", "c"], ["a", "a", "b", "c"], LABELS)
    assert summary["precision"] == summary["recall"] == summary["f1_micro"] == summary["accuracy"] == 0.75


def test_classification_reference_outside_label_set_raises():
    with pytest.raises(ValueError, match="'z'"):
        classification_metrics(["a", "b"], ["a", "z"], LABELS)
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["a", "b"], LABELS)


# ---------------------------------------------------------------- rouge
PAIRS = [
    ("the cat sat", "the cat sat on the mat"),
    ("A man walks his dog. It rains.", "A man is walking a dog in the rain. He is wet."),
    ("#Person1# asks for the bill. #Person2# pays.", "#Person2# pays the bill #Person1# asked for."),
    ("identical text here.", "identical text here."),
]


def test_rouge_hand_checked_trivial_pair():
    _, per_example = rouge_metrics([PAIRS[0][0]], [PAIRS[0][1]])
    # rouge1: 3 of 3 predicted unigrams match (P=1), 3 of 6 reference unigrams (R=1/2) -> F=2/3.
    assert per_example[0]["rouge1"] == pytest.approx(2 / 3)
    # rouge2: both predicted bigrams match (P=1), 2 of 5 reference bigrams (R=2/5) -> F=4/7.
    assert per_example[0]["rouge2"] == pytest.approx(4 / 7)
    assert per_example[0]["rougeL"] == pytest.approx(2 / 3)


def test_rouge_matches_rouge_score_directly():
    predictions, references = zip(*PAIRS)
    summary, per_example = rouge_metrics(list(predictions), list(references))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for (prediction, reference), ours in zip(PAIRS, per_example):
        direct = scorer.score(
            "\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction))
        )
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert ours[name] == pytest.approx(direct[name].fmeasure)
        # Newlines do not change rouge1/2/L, only rougeLsum.
        plain = scorer.score(reference, prediction)
        assert ours["rougeL"] == pytest.approx(plain["rougeL"].fmeasure)
    assert per_example[-1] == {name: pytest.approx(1.0) for name in per_example[-1]}
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert summary[name] == pytest.approx(sum(row[name] for row in per_example) / len(PAIRS))
    assert summary["n"] == len(PAIRS)


def test_rouge_lsum_without_splitting_equals_rougeL():
    predictions, references = zip(*PAIRS)
    summary, _ = rouge_metrics(list(predictions), list(references), split_sentences_for_lsum=False)
    assert summary["rougeLsum"] == pytest.approx(summary["rougeL"])


def test_sentence_splitting_is_offline():
    assert sentence_splitter() in {"nltk-punkt", "regex"}
    assert split_sentences("Hello there. How are you? Fine!\nNew line") == [
        "Hello there.", "How are you?", "Fine!", "New line",
    ]


def test_rouge_multi_reference_takes_the_best():
    _, per_example = rouge_metrics(["the cat sat"], [["a dog ran", "the cat sat on the mat"]])
    assert per_example[0]["rouge1"] == pytest.approx(2 / 3)


def test_empty_prediction_scores_zero():
    _, per_example = rouge_metrics([""], ["some reference"])
    assert all(value == 0.0 for value in per_example[0].values())


# ---------------------------------------------------------------- registry
def test_compute_metrics_dispatch_and_unknown_kind():
    summary, _ = compute_metrics("classification", PREDS, REFS, labels=LABELS)
    assert summary["recall"] == pytest.approx(0.6)
    summary, _ = compute_metrics("generation", ["the cat sat"], ["the cat sat on the mat"])
    assert summary["rouge1"] == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="classification, generation"):
        compute_metrics("bleu", ["x"], ["x"])
    with pytest.raises(ValueError, match="label set"):
        compute_metrics("classification", ["a"], ["a"])


# ---------------------------------------------------------------- wilcoxon
def test_wilcoxon_matches_scipy():
    rng = random.Random(1)
    a = [rng.random() for _ in range(40)]
    b = [x - 0.1 + rng.gauss(0, 0.1) for x in a]
    result = paired_wilcoxon(a, b)
    direct = wilcoxon(a, b, alternative="two-sided")
    assert result["statistic"] == pytest.approx(direct.statistic)
    assert result["p_value"] == pytest.approx(direct.pvalue)
    assert result["n"] == result["n_nonzero"] == 40
    assert result["mean_difference"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 40)


def test_wilcoxon_binary_scores_drop_ties():
    a = [1, 1, 1, 0, 0, 1, 0, 1, 1, 1]
    b = [0, 0, 1, 0, 0, 0, 0, 0, 1, 0]
    result = paired_wilcoxon(a, b)
    assert result["n_nonzero"] == 5
    assert result["p_value"] == pytest.approx(wilcoxon(a, b).pvalue)


def test_wilcoxon_all_equal_and_bad_input():
    result = paired_wilcoxon([0.5, 1.0, 0.0], [0.5, 1.0, 0.0])
    assert result["p_value"] == 1.0 and result["n_nonzero"] == 0
    assert "all differences are zero" in result["note"]
    with pytest.raises(ValueError, match="equal lengths"):
        paired_wilcoxon([1.0, 2.0], [1.0])


def test_wilcoxon_is_exact_when_few_pairs_differ():
    # 4 of 20 pairs differ, all in one direction: the exact two-sided p is 2/2**4 = 0.125;
    # scipy's normal approximation on all 20 pairs would call it significant (p ~ 0.046)
    result = paired_wilcoxon([1.0] * 4 + [0.0] * 16, [0.0] * 20)
    assert result["n_nonzero"] == 4
    assert result["p_value"] == pytest.approx(0.125)
