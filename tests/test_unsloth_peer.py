"""benchmarks/unsloth_peer.py without unsloth (it runs only on the GPU machine, see benchmarks/UNSLOTH.md):
its refusals before unsloth is imported, the names it takes from qlora_speed.py, and the table's
unsloth column (the measured row when there is one, the H100 reference otherwise)."""
import json
from types import SimpleNamespace

import pytest

from benchmark_modules import load_benchmark as load




@pytest.fixture(scope="module")
def peer():
    return load("unsloth_peer")


def pinned_versions(peer, monkeypatch, **found):
    monkeypatch.setattr(peer, "version", lambda name: found.get(name, "0"))


def test_newer_trl_is_refused_with_the_fix(peer, monkeypatch):
    pinned_versions(peer, monkeypatch, trl="1.16.0", transformers="5.17.0")
    with pytest.raises(SystemExit, match=r"trl 1\.16\.0 .*needs trl<=1\.15\.0: put /tmp/site-unsloth first"):
        peer.check_pins()
    pinned_versions(peer, monkeypatch, trl="1.15.0", transformers="5.23.0")
    with pytest.raises(SystemExit, match=r"transformers 5\.23\.0"):
        peer.check_pins()
    pinned_versions(peer, monkeypatch, trl="1.15.0", transformers="5.17.0")
    peer.check_pins()  # the versions unsloth 2026.10.9 was measured with pass


def test_bad_input_ends_before_unsloth_is_imported(peer, monkeypatch, tmp_path):
    out = tmp_path / "r.jsonl"
    with pytest.raises(SystemExit):
        peer.main(["--dir", str(tmp_path)])  # no --out
    with pytest.raises(SystemExit):
        peer.main(["--dir", str(tmp_path), "--out", str(out), "--steps", "2"])
    monkeypatch.setattr(peer, "import_unsloth", lambda: pytest.fail("imported unsloth for a missing checkpoint"))
    assert peer.main(["--dir", str(tmp_path), "--out", str(out)]) == 1
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["what"] == "error" and record["mode"] == "unsloth"
    assert f"no checkpoint at {tmp_path / 'nf4'}" in record["err"]


def test_peer_trains_with_run_hfs_loop(peer):
    """unsloth's row comes from the same loop as stock HF's (rows, optimizer, clock): one function."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    qlora_speed = load("qlora_speed")
    assert peer.TARGETS == qlora_speed.TARGETS
    assert peer.plain_training_loop.__code__.co_code == qlora_speed.plain_training_loop.__code__.co_code
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = model.lm_head.weight.detach().clone()
    out = peer.plain_training_loop(model, SimpleNamespace(batch=2, steps=4, seq=16), torch.device("cpu"))
    assert len(out["losses"]) == 4 and len(out["step_times_s"]) == 4
    assert out["timed_tokens"] == 2 * 2 * 16 and out["tok_s"] > 0  # steps 3..4 timed
    assert not torch.equal(before, model.lm_head.weight)  # the optimizer stepped


def table_of(records, tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    load("qlora_speed").table(SimpleNamespace(files=[str(path)]))
    return capsys.readouterr().out


def test_table_divides_by_the_measured_unsloth_row(tmp_path, capsys):
    rows = [{"what": "mode", "mode": "hf", "tok_s": 4000.0, "median_step_s": 2.0, "peak_gib": 11.0},
            {"what": "mode", "mode": "project", "tok_s": 10000.0, "median_step_s": 0.8, "peak_gib": 7.0}]
    reference = table_of(rows, tmp_path, capsys)
    assert "x unsloth (H100 ref 11,451)" in reference
    assert "| 2.50 | 0.87 |" in reference  # 10,000 / 11,451
    unsloth = {"what": "mode", "mode": "unsloth", "tok_s": 12500.0, "median_step_s": 0.65, "peak_gib": 6.0}
    measured = table_of(rows + [unsloth], tmp_path, capsys)
    assert "x unsloth (measured here 12,500)" in measured
    assert "| 2.50 | 0.80 |" in measured  # 10,000 / 12,500
    assert "| unsloth (FastLanguageModel" in measured and "| 12,500 | 0.650 | 6.00 | 3.12 | 1.00 |" in measured
