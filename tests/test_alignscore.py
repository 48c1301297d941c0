"""AlignScore: loading a checkpoint in the released on-disk format (a tiny random RoBERTa one built
here), nli_sp chunking and aggregation, and the eval stage / report plumbing on tiny-random."""
import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ptq_qlora.metrics import alignscore
from ptq_qlora.metrics.alignscore import (
    context_chunks, context_from_prompt, load_alignscore, score_predictions, sentences,
)

# 130 positions: 128 tokens per pair after RoBERTa's 2 reserved ones. A wide random init, so that
# the pooled output (and the score) depends visibly on the input.
TINY_ROBERTA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=130, initializer_range=0.5)


# ------------------------------------------------------------------------------ tiny checkpoint
def tiny_roberta_tokenizer():
    """A byte-level RoBERTa tokenizer (one token per byte, no merges), special tokens as roberta-base's."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=TINY_ROBERTA["max_position_embeddings"] - 2)


def write_backbone(folder: Path, **overrides) -> Path:
    """What `roberta-large` is on the Hub, small: config.json and the tokenizer files."""
    from transformers import RobertaConfig

    tokenizer = tiny_roberta_tokenizer()
    config = RobertaConfig(vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           **{**TINY_ROBERTA, **overrides})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_alignscore_checkpoint(path: Path, backbone: Path, seed: int = 0, hyper_parameters=None) -> Path:
    """A Lightning checkpoint as BERTAlignModel saves it: state_dict keys `base_model.*` (with the
    `position_ids` buffer older transformers kept), `mlm_head.*`, `bin_layer.*`, `tri_layer.*`,
    `reg_layer.*`, and the constructor's hyper-parameters (`model` names the backbone)."""
    from transformers import AutoConfig, RobertaForMaskedLM, RobertaModel

    config = AutoConfig.from_pretrained(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {"base_model": RobertaModel(config), "mlm_head": RobertaForMaskedLM(config).lm_head,
                 "bin_layer": torch.nn.Linear(config.hidden_size, 2),
                 "tri_layer": torch.nn.Linear(config.hidden_size, 3),
                 "reg_layer": torch.nn.Linear(config.hidden_size, 1)}
        torch.nn.init.normal_(parts["tri_layer"].weight, std=2.0)  # spread the random head's probabilities
    state = {f"{name}.{key}": value.clone() for name, part in parts.items() for key, value in part.state_dict().items()}
    state["base_model.embeddings.position_ids"] = torch.arange(config.max_position_embeddings).expand((1, -1))
    hparams = {"model": str(backbone), "using_pretrained": True} if hyper_parameters is None else hyper_parameters
    torch.save({"epoch": 0, "global_step": 10, "pytorch-lightning_version": "1.7.7", "state_dict": state,
                "hparams_name": "kwargs", "hyper_parameters": hparams}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignscore")
    backbone = write_backbone(root / "tiny-roberta")
    return types.SimpleNamespace(root=root, backbone=backbone,
                                 ckpt=write_alignscore_checkpoint(root / "AlignScore-tiny.ckpt", backbone))


@pytest.fixture(scope="module")
def scorer(tiny):
    return load_alignscore(tiny.ckpt, batch_size=4)


DIALOGUE = ("#Person1#: Hello, I would like to book a table for two tonight. #Person2#: Certainly. "
            "At what time? #Person1#: Around seven, please. #Person2#: Done, see you at seven.")


# ------------------------------------------------------------------------------ the scorer
def test_weights_come_from_the_checkpoint_keys(tiny, scorer):
    """The scorer's P(aligned) equals one computed by hand from the checkpoint's base_model.* and
    tri_layer.* tensors (softmax index 0 over the pooler output), on the reference's pair encoding."""
    from transformers import AutoConfig, RobertaModel

    state = torch.load(tiny.ckpt, weights_only=True)["state_dict"]
    base = RobertaModel(AutoConfig.from_pretrained(tiny.backbone))
    base.load_state_dict({k.removeprefix("base_model."): v for k, v in state.items()
                          if k.startswith("base_model.") and not k.endswith("position_ids")})
    base.eval()
    pairs = [("The sky is blue. Grass is green.", "The sky is blue."), (DIALOGUE, "They book a table.")]
    expected = []
    with torch.no_grad():
        for chunk, sentence in pairs:
            enc = tiny_roberta_tokenizer()(chunk, sentence, truncation="only_first", max_length=128,
                                           return_tensors="pt")
            assert enc["input_ids"][0, :1].item() == 0 and (enc["input_ids"][0] == 2).sum() == 3  # <s> a </s></s> b </s>
            pooled = base(**enc).pooler_output
            logits = pooled @ state["tri_layer.weight"].T + state["tri_layer.bias"]
            expected.append(logits.softmax(-1)[0, 0].item())
    assert scorer.pair_probabilities(pairs) == pytest.approx(expected, abs=1e-5)
    assert scorer.backbone == str(tiny.backbone) and scorer.max_length == 128  # 130 positions - 2


def test_scores_are_probabilities_and_deterministic(tiny, scorer):
    contexts = [DIALOGUE, "Paris is the capital of France. It is large.", "Nothing here."]
    claims = ["They book a table for seven.", "Paris is in France. It is small.", "A cat sat on a mat."]
    first = scorer.score(contexts, claims)
    assert all(0.0 <= s <= 1.0 for s in first) and len(set(first)) == 3
    assert scorer.score(contexts, claims) == first
    again = load_alignscore(tiny.ckpt, batch_size=1).score(contexts, claims)  # other batches, fresh load
    assert again == pytest.approx(first, abs=1e-5)


def test_long_context_is_chunked_max_over_chunks_mean_over_sentences(scorer):
    openings = ["Alice sold apples", "Bob fixed a bike", "Carol sang loudly", "Dan read news",
                "Eve baked bread", "Frank lost keys", "Grace won gold", "Hank fed cats"]
    # 8 sentences of 90 words; each starts differently, so the chunks differ within the backbone's 128 tokens
    context = " ".join(f"{opening} " + "word " * 86 + f"end{i}." for i, opening in enumerate(openings))
    chunks = context_chunks(context)
    # 720 // 350 + 1 = 3 chunks wanted -> 8 // 3 = 2 sentences per chunk -> 4 chunks (the reference's rule)
    parts = sentences(context)
    assert len(parts) == 8 and chunks == [" ".join(parts[i:i + 2]) for i in range(0, 8, 2)]
    assert context_chunks("One short sentence. And another.") == ["One short sentence. And another."]

    claim = "Alice sold apples. Something else entirely! Grace won gold?"
    claim_sentences = sentences(claim)
    assert len(claim_sentences) == 3
    grid = torch.tensor(scorer.pair_probabilities([(c, s) for c in chunks for s in claim_sentences])).view(4, 3)
    assert grid.std(dim=0).min() > 1e-4  # the chunks score differently: max and mean can differ
    expected = grid.max(dim=0).values.mean().item()
    (score,) = scorer.score([context], [claim])
    assert score == pytest.approx(expected, abs=1e-6)
    assert score != pytest.approx(grid.mean().item(), abs=1e-6)  # not a plain mean: the aggregation matters


def test_truncation_keeps_pairs_within_the_backbone(scorer):
    long_context = "A sentence with many words in it that keeps going on. " * 20  # ~1100 tokens > 128
    long_claim = "x" * 300 + "."  # longer than the limit by itself: both sides truncated
    encoded = [scorer._encode(long_context, "Short claim."), scorer._encode("Short context.", long_claim)]
    assert all(len(e["input_ids"]) == scorer.max_length for e in encoded)
    assert encoded[0]["input_ids"][-4:-1] == scorer.tokenizer("Short claim.", add_special_tokens=False)["input_ids"][-3:]
    scores = scorer.score([long_context, "Short context."], ["Short claim.", long_claim])
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_empty_prediction_scores_zero_and_is_counted(scorer):
    summary, scores = score_predictions(scorer, [DIALOGUE, DIALOGUE], ["", "They book a table."])
    assert scores[0] == 0.0 and scores[1] > 0.0
    assert summary["alignscore"] == pytest.approx(sum(scores) / 2)
    setup = summary["alignscore_setup"]
    assert setup["empty_predictions_scored_0"] == 1 and setup["mode"] == "nli_sp" and setup["n"] == 2
    assert setup["checkpoint"]["name"] == "AlignScore-tiny.ckpt"


def test_context_is_recovered_from_the_dialogsum_prompt():
    from ptq_qlora.data.config import TaskConfig, load_yaml_config
    from ptq_qlora.data.prompts import generation_prompt

    task = load_yaml_config(Path(__file__).parents[1] / "conf/task/dialogsum.yaml", TaskConfig)
    assert task.alignscore.checkpoint is None  # off by default
    prompt = generation_prompt(task.prompt_template, DIALOGUE)
    assert context_from_prompt(task.prompt_template, prompt) == DIALOGUE
    with pytest.raises(ValueError, match="does not match task.prompt_template"):
        context_from_prompt(task.prompt_template, "Something else: " + DIALOGUE)
    with pytest.raises(ValueError, match=r"contain \{text\} once"):
        context_from_prompt("{text} and {labels}", "x")


# ------------------------------------------------------------------------------ loading errors
def test_loading_errors_are_one_line(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="AlignScore checkpoint .*missing.ckpt.* does not exist"):
        load_alignscore(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is not an AlignScore checkpoint"):
        load_alignscore(tmp_path / "other.ckpt")
    wider = write_backbone(tmp_path / "wider", hidden_size=48, num_attention_heads=3)
    with pytest.raises(ValueError, match="does not fit backbone") as err:
        load_alignscore(tiny.ckpt, backbone=str(wider))
    assert "\n" not in str(err.value)
    nameless = write_alignscore_checkpoint(tmp_path / "nameless.ckpt", tiny.backbone, hyper_parameters={})
    with pytest.raises(ValueError, match="set task.alignscore.backbone"):
        load_alignscore(nameless)


def test_backbone_missing_offline_says_where_it_comes_from(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE set.*Hugging Face Hub") as err:
        load_alignscore(tiny.ckpt, backbone="no-such-org/no-such-roberta")
    assert "\n" not in str(err.value)


def test_checkpoint_holding_classes_of_an_absent_library_loads(tiny, tmp_path, scorer):
    """Lightning may pickle its own classes (AttributeDict) into `hyper_parameters`; without that
    library installed the weights must still load."""
    module = types.ModuleType("absent_lightning_for_test")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    sys.modules[module.__name__] = module
    try:
        path = write_alignscore_checkpoint(tmp_path / "lightning.ckpt", tiny.backbone,
                                           hyper_parameters=AttributeDict(model=str(tiny.backbone)))
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    loaded = load_alignscore(path)
    assert loaded.backbone == str(tiny.backbone)
    assert loaded.score([DIALOGUE], ["They book a table."]) == pytest.approx(
        scorer.score([DIALOGUE], ["They book a table."]), abs=1e-6)


# ------------------------------------------------------------------------------ eval stage + report
def _eval_job(compose_cfg, store: Path, *overrides):
    from ptq_qlora.stages.runner import run_job

    cfg = compose_cfg(*TINY, "task=dialogsum", "data.max_test=6", *overrides, config_name="eval")
    cfg.paths.store = str(store)
    return cfg, run_job(cfg)


def _alscore_cell(store: Path):
    from ptq_qlora.report.build import build_report

    (record,) = build_report(store).table.records()
    return record["dialogsum/alignscore"]


def test_eval_stage_writes_alignscore_and_the_report_shows_it(tiny, tmp_path, compose_cfg):
    from ptq_qlora.stages.lineage import eval_lineage

    cfg, summary = _eval_job(compose_cfg, tmp_path / "scored", f"task.alignscore.checkpoint={tiny.ckpt}")
    (folder,) = (tmp_path / "scored").glob("eval-*")
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(0.0 <= r["alignscore"] <= 1.0 for r in rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["alignscore"] == pytest.approx(sum(r["alignscore"] for r in rows) / 6)
    assert metrics["alignscore_setup"]["checkpoint"]["name"] == "AlignScore-tiny.ckpt"
    assert list(summary["results"].values())[0]["alignscore"] == metrics["alignscore"]
    # the dialogue each prediction was scored against: the same as scoring it directly
    direct = load_alignscore(tiny.ckpt).score([context_from_prompt(cfg.task.prompt_template, p) for p in
                                               _prompts(cfg)], [r["prediction"] for r in rows])
    assert [r["alignscore"] for r in rows] == pytest.approx(direct, abs=1e-5)
    assert _alscore_cell(tmp_path / "scored") == pytest.approx(metrics["alignscore"])

    cfg_plain, _ = _eval_job(compose_cfg, tmp_path / "plain")
    (plain,) = (tmp_path / "plain").glob("eval-*")
    assert "alignscore" not in json.loads((plain / "metrics.json").read_text())
    assert "alignscore" not in json.loads((plain / "predictions.jsonl").read_text().splitlines()[0])
    assert _alscore_cell(tmp_path / "plain") == "n/a"
    # scored and unscored evals have different lineages; the unscored one is what it was before the option
    assert folder.name != plain.name
    with_option_removed = _without_alignscore(cfg_plain)
    assert eval_lineage(cfg_plain, "p") == eval_lineage(with_option_removed, "p")


def _prompts(cfg):
    from ptq_qlora.data import load_task_data
    from ptq_qlora.models.loading import load_tokenizer
    from ptq_qlora.stages.runner import start_ref

    data = load_task_data(cfg.task, cfg.data, tokenizer=load_tokenizer(start_ref(cfg).model_path))
    return list(data.test["prompt"])


def _without_alignscore(cfg):
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    del plain["task"]["alignscore"]
    return OmegaConf.create(plain)


def test_missing_checkpoint_fails_before_generation(tmp_path, compose_cfg, monkeypatch):
    import ptq_qlora.stages.evaluate as evaluate

    monkeypatch.setattr(evaluate, "generate_batched", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _eval_job(compose_cfg, tmp_path / "runs", f"task.alignscore.checkpoint={tmp_path / 'nope.ckpt'}")
    assert not list((tmp_path / "runs").glob("*eval-*"))


def test_missing_checkpoint_fails_before_training(tmp_path, compose_cfg, monkeypatch):
    import ptq_qlora.stages.sft as sft
    from ptq_qlora.stages.runner import run_job

    monkeypatch.setattr(sft, "train_causal_lm", lambda *a, **k: pytest.fail("SFT started"))
    cfg = compose_cfg(*TINY, "task=dialogsum", "stage=sft", f"task.alignscore.checkpoint={tmp_path / 'nope.ckpt'}")
    cfg.paths.store = str(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_job(cfg)


def test_checkpoint_on_a_classification_task_is_refused(tiny, compose_cfg):
    cfg = compose_cfg(*TINY, "task=bitext", f"task.alignscore.checkpoint={tiny.ckpt}")
    with pytest.raises(ValueError, match="AlignScore scores generated text"):
        alignscore.settings_of(cfg.task)


def test_report_tests_alignscore_per_example_when_both_sides_have_it(tmp_path):
    from ptq_qlora.report.build import build_report
    from ptq_qlora.report.synthetic import write_chain, write_eval

    def rows(shift):
        return [{"id": f"d{i}", "rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.4, "rougeLsum": 0.5,
                 "alignscore": min(1.0, 0.1 * i + shift)} for i in range(8)]

    refs = write_chain(tmp_path, "m", methods=("bnb",))
    for label, shift in (("PTQ-BNB-4bit", 0.0), ("PTQ-BNB-4bit+QLoRA", 0.15)):
        r = rows(shift)
        write_eval(tmp_path, refs[label], "dialogsum", r,
                   extra_metrics={"alignscore": sum(x["alignscore"] for x in r) / len(r)})
    write_eval(tmp_path, refs["SFT-16bit"], "dialogsum", rows(0.0))  # unscored: no AlignScore test with it
    tests = build_report(tmp_path).per_example
    metrics = {(t["a"], t["b"], t["metric"]) for t in tests}
    assert ("PTQ-BNB-4bit+QLoRA", "PTQ-BNB-4bit", "alignscore") in metrics
    assert not any(t["metric"] == "alignscore" and "SFT-16bit" in (t["a"], t["b"]) for t in tests)
    test = next(t for t in tests if t["metric"] == "alignscore")
    assert test["n_nonzero"] == 8 and test["mean_difference"] > 0 and test["significant"]
