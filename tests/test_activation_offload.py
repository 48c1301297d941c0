"""The offloaded activation checkpoint (ptq_qlora/activation_offload.py, hardware.activation_offload) on
CPU, where it runs without streams or copies: the same loss and LoRA gradients as torch's checkpoint and
as no checkpointing (tiny random Llama, float32, LoRA dropout on so the RNG replay matters), over two
optimizer steps and with gradient accumulation; a forward that is never backwarded leaves the next step
alone; bf16 autocast is replayed; tuple outputs, non-tensor arguments and an input without grad; and the
Trainer wiring installs it only when the option is on. The stream/copy path is checked on a GPU by
`gpu_selfcheck()`.

Tolerance: float32 and the same kernels replayed, so 1e-5 relative (observed: 0). The negative control
(a recompute without the RNG replay) is far above that."""
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from ptq_qlora import activation_offload, training
from ptq_qlora.activation_offload import install_offloaded_checkpointing, live_saved_inputs, offloaded_checkpoint
from ptq_qlora.models.tiny import TINY_DEFAULTS
from ptq_qlora.quantizers.testing import relative_gradient_error

VOCAB = 259
LAYERS = 3
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and on a shared CPU spare threads only spin (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(checkpointing: str | None, dropout: float = 0.1):
    """The same tiny LoRA Llama each call; checkpointing None, "torch" or "offloaded"."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_DEFAULTS, "num_hidden_layers": LAYERS}, vocab_size=VOCAB))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # LoRA B starts at zero, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        if checkpointing == "offloaded":
            assert install_offloaded_checkpointing(model) == LAYERS
    model.train()
    return model


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 20), generator=gen) for _ in range(n)]


def _train(model, steps=2, accum=1, autocast=False, check_saved=False):
    """Losses and LoRA gradients of each step (SGD in between, so step 2 depends on step 1)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batches = iter(_batches(steps * accum))
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            ids = next(batches)
            torch.manual_seed(100 * step + micro)  # the dropout masks of this micro-batch
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss / accum
            if check_saved:
                assert live_saved_inputs() == LAYERS  # one held input per checkpointed layer
            loss.backward()
            if check_saved:
                assert live_saved_inputs() == 0  # every saved input let go after its backward
            losses.append(loss.item())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        history.append((sum(losses), grads))
        opt.step()
    return history


def _assert_same(history, reference, tol=1e-5):
    for (loss, grads), (ref_loss, ref_grads) in zip(history, reference, strict=True):
        assert abs(loss - ref_loss) <= tol * abs(ref_loss)
        total, worst = relative_gradient_error(grads, ref_grads)
        assert total < tol and worst < 10 * tol, (total, worst)


@pytest.mark.parametrize("accum", [1, 2])
def test_offloaded_checkpoint_gives_torch_checkpoint_and_plain_gradients(accum):
    plain = _train(_model(None), accum=accum)
    torch_ckpt = _train(_model("torch"), accum=accum)
    offloaded = _train(_model("offloaded"), accum=accum, check_saved=True)
    _assert_same(torch_ckpt, plain)
    _assert_same(offloaded, plain)
    _assert_same(offloaded, torch_ckpt)


def test_backward_prefetches_the_layer_backwarded_next(monkeypatch):
    """Layer i's backward starts bringing back the input of the layer whose forward ran just before
    (on CPU the copy is a no-op; this checks the bookkeeping that picks it), per micro-batch."""
    forwards, prefetched = [], []
    remember, forget_and_next = activation_offload._remember, activation_offload._forget_and_next

    def spy_remember(entry):
        forwards.append(entry)
        remember(entry)

    def spy_next(entry):
        prefetched.append(forget_and_next(entry))
        return prefetched[-1]

    monkeypatch.setattr(activation_offload, "_remember", spy_remember)
    monkeypatch.setattr(activation_offload, "_forget_and_next", spy_next)
    _train(_model("offloaded"), steps=2, accum=2)
    assert len(forwards) == 2 * 2 * LAYERS
    expected = []
    for k in range(0, len(forwards), LAYERS):  # one micro-batch: backward runs from its last layer down
        micro = forwards[k:k + LAYERS]
        expected += [micro[i - 1] if i else None for i in reversed(range(LAYERS))]
    assert [id(e) if e is not None else None for e in prefetched] == \
        [id(e) if e is not None else None for e in expected]


def test_recompute_without_rng_replay_is_caught(monkeypatch):
    """Negative control: with the RNG not restored the dropout masks of the recompute differ."""
    reference = _train(_model("torch"), steps=1)
    restore = activation_offload._replayed

    def without_rng(autocast, rng, device):
        return restore(autocast, (torch.get_rng_state(), None), device)

    monkeypatch.setattr(activation_offload, "_replayed", without_rng)
    (_, grads), = _train(_model("offloaded"), steps=1)
    assert relative_gradient_error(grads, reference[0][1])[0] > 1e-3


def test_autocast_is_replayed_in_the_recompute():
    reference = _train(_model("torch"), steps=1, autocast=True)
    _assert_same(_train(_model("offloaded"), steps=1, autocast=True), reference)
    fp32 = _train(_model("offloaded"), steps=1, autocast=False)
    assert relative_gradient_error(fp32[0][1], reference[0][1])[0] > 1e-3  # bf16 does show in the gradients


def test_forward_never_backwarded_leaves_the_next_steps_alone(monkeypatch):
    reference = _train(_model(None))
    model = _model("offloaded")
    ids = _batches(1, seed=9)[0]
    stale = model(input_ids=ids, labels=ids).loss  # kept alive, never backwarded
    assert live_saved_inputs() == LAYERS
    layer = model.get_base_model().model.layers[1]
    original = type(layer).forward

    def fails_once(self, *args, **kwargs):
        monkeypatch.setattr(type(layer), "forward", original)
        raise RuntimeError("forward interrupted")

    monkeypatch.setattr(type(layer), "forward", fails_once)
    with pytest.raises(RuntimeError, match="interrupted"):
        model(input_ids=ids, labels=ids)
    _assert_same(_train(model), reference)
    assert live_saved_inputs() == LAYERS  # only the stale forward's inputs are left
    del stale
    assert live_saved_inputs() == 0


class _TupleLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, hidden, scale, mask=None, *, shift=0.0):
        out = torch.tanh(self.linear(hidden)) * scale + shift
        return out if mask is None else (out, "aux", mask)


@pytest.mark.parametrize("input_grad", [True, False])
def test_tuple_output_non_tensor_arguments_and_input_without_grad(input_grad):
    torch.manual_seed(0)
    layer = _TupleLayer()
    x = torch.randn(3, 8, requires_grad=input_grad)
    mask = torch.ones(3, 8)
    expected = layer(x, 2.0, mask, shift=0.5)
    expected[0].sum().backward()
    ref = [p.grad.clone() for p in layer.parameters()], (x.grad.clone() if input_grad else None)
    layer.zero_grad(set_to_none=True)
    x.grad = None

    out = offloaded_checkpoint(layer, x, 2.0, mask, shift=0.5)
    assert isinstance(out, tuple) and out[1] == "aux" and out[2] is mask
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    out[0].sum().backward()
    for got, want in zip(layer.parameters(), ref[0], strict=True):
        torch.testing.assert_close(got.grad, want, rtol=1e-6, atol=1e-7)  # weights get gradients either way
    if input_grad:
        torch.testing.assert_close(x.grad, ref[1], rtol=1e-6, atol=1e-7)
    else:
        assert x.grad is None
    plain = offloaded_checkpoint(layer, x, 2.0)  # a layer returning a tensor returns a tensor
    assert isinstance(plain, torch.Tensor)


def test_other_tensors_requiring_grad_are_refused():
    layer = _TupleLayer()
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        offloaded_checkpoint(layer, x, torch.tensor(2.0, requires_grad=True))
    with pytest.raises(ValueError, match="requires grad"):
        offloaded_checkpoint(layer, x, 2.0, shift=torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match="first positional"):
        offloaded_checkpoint(layer, 2.0, x)
    with torch.no_grad():  # transformers 5.23 checkpoints under no_grad too: the layer just runs
        assert offloaded_checkpoint(layer, x, 2.0).shape == (3, 8)
    assert live_saved_inputs() == 0


def test_install_refuses_a_model_without_checkpointing():
    with pytest.raises(ValueError, match="no layer of the model is checkpointed"):
        install_offloaded_checkpointing(_model(None))


class _RecordCheckpointFunction(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        layers = model.get_base_model().model.layers
        self.seen.append([(layer.gradient_checkpointing, layer._gradient_checkpointing_func) for layer in layers])


@pytest.mark.parametrize("offload", [True, False])
def test_train_tokenized_installs_the_offloaded_checkpoint_only_when_on(tmp_path, monkeypatch, offload):
    from datasets import Dataset

    from ptq_qlora.models.tiny import byte_level_tokenizer

    gen = torch.Generator().manual_seed(0)
    ds = Dataset.from_list([{"input_ids": torch.randint(0, 256, (16,), generator=gen).tolist(),
                             "completion_mask": [0] * 8 + [1] * 8, "length": 16} for _ in range(4)])
    hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_dtype="float32", train_batch_size=2,
                         grad_accum=1, dataloader_workers=0, gradient_checkpointing=True, activation_offload=offload,
                         num_processes=1, attn_implementation="sdpa")
    train_cfg = dict(lr=1e-3, scheduler="constant", epochs=1, max_steps=2, warmup=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_steps=1000, save_total_limit=1)
    recorder = _RecordCheckpointFunction()
    saved = []
    remember = activation_offload._remember
    monkeypatch.setattr(activation_offload, "_remember", lambda entry: (saved.append(1), remember(entry)))
    metrics = training.train_tokenized(_model(None), byte_level_tokenizer(), ds, train_cfg, hw, tmp_path, seed=0,
                                       callbacks=[recorder])
    assert metrics["train_steps"] == 2 and len(recorder.seen) == 2
    for layers in recorder.seen:
        assert len(layers) == LAYERS and all(on for on, _ in layers)  # the Trainer's checkpointing is on
        assert all((fn is offloaded_checkpoint) == offload for _, fn in layers)
    assert len(saved) == (2 * LAYERS if offload else 0)  # the layers did run through it, once a step
