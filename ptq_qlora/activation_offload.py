"""Offloaded activation checkpointing (`hardware.activation_offload`), asynchronous, after unsloth's
"offloaded gradient checkpointing": each checkpointed layer keeps only its input hidden state, and
keeps it in pinned host memory instead of on the GPU.

transformers' own `offload` wraps torch's checkpoint in `save_on_cpu`, whose copies run on the compute
stream and stall it (measured -7.5% tokens/s on a 7B QLoRA, benchmarks/RESULTS.md). Here:
- forward: the layer runs under no_grad while a side CUDA stream copies its input to pinned host
  memory (device->host, non_blocking), so the copy overlaps the layer's compute;
- backward: layer i's input was brought back (host->device) ahead of time, and layer i's backward
  starts the copy of the input of the layer backwarded next (the one whose forward ran just before
  i), so that copy overlaps layer i's recompute + backward; layer i waits (on the GPU) only for its
  own copy's event. The layer is recomputed with grad enabled, under the forward's autocast state
  and RNG state (torch.utils.checkpoint's preserve_rng_state: dropout masks, e.g. LoRA's, come out
  the same), and backwarded with the incoming gradient.

Only the first positional argument (the hidden state, transformers' convention for checkpointed
layers) is offloaded and gets a gradient; another tensor argument that requires grad is refused,
since this reentrant-style checkpoint could not give it one. Extra outputs of a layer that returns a
tuple come from the no_grad forward and carry no gradient. The copy to the host is taken when the
layer runs: the input must not be modified in place afterwards (transformers' decoder loops don't).
Like any reentrant checkpoint, it suits DDP only with find_unused_parameters=False (the project's).

Without CUDA the same code runs with no streams and no copies (the "host" is where the tensor is), so
CPU tests exercise the recompute, RNG, autocast and bookkeeping.

`install_offloaded_checkpointing(model)` puts `offloaded_checkpoint` on every module transformers'
checkpointing set up (also through a peft wrapper); `python -m ptq_qlora.activation_offload` runs
`gpu_selfcheck()` on a GPU.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils._pytree import tree_leaves

_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}
# Saved inputs in forward order (weak: a forward that is never backwarded frees its entries with its
# graph). Only a prefetch hint: correctness never depends on it.
_forward_order: list[weakref.ref] = []
_order_lock = threading.Lock()  # forward runs on the main thread, CUDA backward on autograd's thread
# set while a layer is recomputed for its backward (on the thread running that backward)
_recompute = threading.local()


def recomputing() -> bool:
    """True inside an offloaded checkpoint's recomputation: what a function saves there lives only until
    that layer's backward, which follows at once (fused_lora keeps its dequantized weights for it)."""
    return getattr(_recompute, "active", False)


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


class _SavedInput:
    """One checkpointed layer's input: in pinned host memory from the forward on, back on the device
    (`fetch`, possibly ahead of time as a prefetch) for the backward."""

    __slots__ = ("host", "device", "on_device", "ready", "__weakref__")

    def __init__(self, x: torch.Tensor):
        self.device, self.ready = x.device, None
        if x.device.type != "cuda":
            self.host = self.on_device = x.detach()
            return
        compute = torch.cuda.current_stream(x.device)
        side = _side_stream(x.device)
        side.wait_stream(compute)  # x is fully written by the compute stream before the copy reads it
        with torch.cuda.stream(side):
            self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            # non_blocking from pinned memory: the caching host allocator records this copy, so the
            # host block is not handed out again before the copy has finished
            self.host.copy_(x, non_blocking=True)
        # x is dropped after the forward; record_stream keeps the compute stream from reusing its
        # memory before the side stream's copy has read it
        x.record_stream(side)
        self.on_device = None

    def fetch(self) -> None:
        """Start the host->device copy on the side stream (no-op when already started or on CPU)."""
        if self.on_device is not None:
            return
        compute = torch.cuda.current_stream(self.device)
        dst = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        side = _side_stream(self.device)
        # dst comes from the compute stream's pool: kernels queued there may still use the block
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            dst.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        dst.record_stream(side)  # freed on the compute stream (or never used): not reused under the copy
        self.on_device = dst

    def take(self) -> torch.Tensor:
        """The input on its device, usable on the current stream; the entry lets go of both copies."""
        self.fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)  # waits on the GPU, not the host
        x, self.host, self.on_device = self.on_device, None, None
        return x


def _remember(entry: _SavedInput) -> None:
    with _order_lock:
        _forward_order[:] = [ref for ref in _forward_order if ref() is not None]
        _forward_order.append(weakref.ref(entry))


def _forget_and_next(entry: _SavedInput) -> _SavedInput | None:
    """Drop `entry` from the forward order; the live entry just below it is backwarded next."""
    with _order_lock:
        for k in range(len(_forward_order) - 1, -1, -1):
            if _forward_order[k]() is entry:
                del _forward_order[k]
                for ref in reversed(_forward_order[:k]):
                    below = ref()
                    if below is not None and below.host is not None and below.device == entry.device:
                        return below
                return None
    return None


def live_saved_inputs() -> int:
    """Saved layer inputs still held (by graphs not yet backwarded or freed)."""
    with _order_lock:
        return sum(ref() is not None for ref in _forward_order)


def _autocast_state(device_type: str) -> list[tuple]:
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())
            for kind in dict.fromkeys((device_type, "cpu"))]


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed(autocast: list[tuple], rng: tuple, device: torch.device):
    """Grad on, the forward's autocast state and RNG state (the caller's RNG is restored after)."""
    cpu_rng, device_rng = rng
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[device] if device_rng is not None else []))
        torch.set_rng_state(cpu_rng)
        if device_rng is not None:
            torch.cuda.set_rng_state(device_rng, device)
        stack.enter_context(torch.enable_grad())
        for kind, enabled, dtype, cache in autocast:
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache))
        yield


def _hidden_of(output):
    """(hidden state, the other outputs or None): a decoder layer returns a tensor (transformers 5
    Llama/Qwen2) or a tuple whose first element is the hidden state."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], tuple(output[1:])
    raise TypeError(f"offloaded checkpoint: a layer must return a tensor or a tuple starting with one, "
                    f"got {type(output).__name__}")


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, rest_box, anchor, hidden, *rest):
        # `anchor` (a 0-element tensor requiring grad) makes the output require grad, so the backward
        # runs and the layer's trainable weights get gradients even when `hidden` does not require grad
        ctx.run, ctx.rest = run, rest
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng = _rng_state(hidden.device)
        ctx.saved = _SavedInput(hidden)
        _remember(ctx.saved)
        with torch.no_grad():
            out, others = _hidden_of(run(hidden, *rest))
        rest_box.append(others)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved
        hidden = saved.take()
        following = _forget_and_next(saved)
        if following is not None:
            following.fetch()  # queued behind this layer's copy, overlaps this layer's recompute
        hidden_needs_grad = ctx.needs_input_grad[3]
        hidden = hidden.detach().requires_grad_(hidden_needs_grad)
        with _replayed(ctx.autocast, ctx.rng, hidden.device):
            _recompute.active = True
            try:
                out, _ = _hidden_of(ctx.run(hidden, *ctx.rest))
            finally:
                _recompute.active = False
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_hidden = hidden.grad if hidden_needs_grad else None
        n_rest = len(ctx.rest)
        ctx.run = ctx.rest = ctx.saved = None
        return (None, None, None, grad_hidden) + (None,) * n_rest


def _refuse_grad_tensors(where: str, values) -> None:
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in tree_leaves(values)):
        raise ValueError(f"offloaded checkpoint: a tensor in the layer's {where} requires grad; only the first "
                         "positional argument (the hidden state) gets a gradient")


def offloaded_checkpoint(function, *args, **kwargs):
    """Drop-in for transformers' `_gradient_checkpointing_func`: `function(*args, **kwargs)` checkpointed,
    its first positional argument kept in pinned host memory until the backward."""
    if not torch.is_grad_enabled():  # transformers 5.23 checkpoints under no_grad too: nothing to save
        return function(*args, **kwargs)
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        raise ValueError("offloaded checkpoint: the layer's hidden state must be its first positional argument")
    _refuse_grad_tensors("other arguments", (args[1:], kwargs, getattr(function, "args", ()),
                                             getattr(function, "keywords", {})))
    run = function if not kwargs else (lambda *a: function(*a, **kwargs))
    rest_box: list = []
    anchor = torch.empty(0, requires_grad=True)
    hidden = _OffloadedCheckpoint.apply(run, rest_box, anchor, *args)
    others = rest_box[0]
    return hidden if others is None else (hidden, *others)


def install_offloaded_checkpointing(model) -> int:
    """Replace the checkpoint function on every module transformers' checkpointing set up (a peft model
    reaches its base model's modules through `modules()`); returns how many layers are checkpointed.
    Call after `activation_checkpointing_enable` (the Trainer calls it at the start of `train()`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = offloaded_checkpoint
            layers += isinstance(module, GradientCheckpointingLayer) and bool(module.gradient_checkpointing)
    if layers == 0:
        raise ValueError("activation_offload: no layer of the model is checkpointed; "
                         "enable activation checkpointing first")
    return layers


def _trainer_callback_class():
    from transformers import TrainerCallback

    class OffloadedCheckpointing(TrainerCallback):
        """Installs the offloaded checkpoint once the Trainer has enabled checkpointing (in `train()`,
        before `on_train_begin`, in transformers 5.23 and 5.25)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = install_offloaded_checkpointing(model)
            import logging

            logging.getLogger(__name__).info("activation_offload: %d layers keep their input in pinned host "
                                             "memory (asynchronous copies)", layers)

    return OffloadedCheckpointing


def offload_callback():
    """A TrainerCallback that installs `offloaded_checkpoint` at the start of training."""
    return _trainer_callback_class()()


# ----------------------------------------------------------------------------------------------------
# GPU self-check (run by hand on a CUDA machine: python -m ptq_qlora.activation_offload)


def gpu_selfcheck(layers: int = 16, hidden: int = 2048, intermediate: int = 5632, batch: int = 4, seq: int = 2048,
                  steps: int = 5, lora_dropout: float = 0.05) -> dict:
    """On one GPU, a random bf16 Llama with LoRA (dropout on, so the RNG replay matters) under bf16
    autocast: no checkpointing, torch's checkpoint (non-reentrant), transformers' `offload`
    (save_on_cpu) and this module's offloaded checkpoint. Prints loss, LoRA-gradient error against
    torch's checkpoint, peak memory and tokens/s of each; raises if the gradients disagree."""
    import time

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    assert torch.cuda.is_available(), "gpu_selfcheck needs CUDA"
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                         max_position_embeddings=seq)
    with device:  # initialised on the GPU: a CPU init of ~1B parameters takes long
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # LoRA B starts at zero, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def step(seed: int) -> float:
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    results = {}
    for mode in ("none", "torch", "transformers_offload", "offloaded"):
        if mode == "none":
            model.activation_checkpointing_disable()
        else:
            model.activation_checkpointing_enable({"use_reentrant": False}, offload=mode == "transformers_offload")
            if mode == "offloaded":
                install_offloaded_checkpointing(model)
        model.zero_grad(set_to_none=True)
        loss = step(0)
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for k in range(steps):
            step(k + 1)
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        assert live_saved_inputs() == 0, "saved layer inputs outlived their backward"
        results[mode] = dict(loss=loss, grads=grads, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                             tokens_per_s=batch * seq * steps / seconds)
    reference = results["torch"]["grads"]
    norm = sum((g ** 2).sum() for g in reference.values()) ** 0.5
    saved_gib = layers * batch * seq * hidden * 2 / 2**30
    print(f"gpu_selfcheck: {layers} layers, hidden {hidden}, batch {batch}x{seq}, bf16 autocast, LoRA r16 "
          f"dropout {lora_dropout}; expected saving vs torch checkpoint ~{saved_gib:.2f} GiB")
    for mode, r in results.items():
        diff = sum(((r["grads"][n] - g) ** 2).sum() for n, g in reference.items()) ** 0.5
        r["grad_rel_err_vs_torch"] = (diff / norm).item()
        print(f"  {mode:22s} loss {r['loss']:.6f}  grad rel err vs torch {r['grad_rel_err_vs_torch']:.2e}  "
              f"peak {r['peak_gib']:.2f} GiB  {r['tokens_per_s']:,.0f} tok/s")
        del r["grads"]
    # The offloaded checkpoint replays the same kernels on the same inputs and RNG as torch's checkpoint;
    # only nondeterministic GPU kernels (e.g. attention backward) and the recomputation's bf16 order
    # separate them, as they separate checkpointing from none and transformers' offload from torch's
    # checkpoint (H200, RESULTS.md third session: 2.3e-3, 5.6e-3; ours 5.7e-3). A broken RNG/autocast
    # replay or a stale copy shows as ~1e-1.
    allowed = max(2e-3, 2 * results["none"]["grad_rel_err_vs_torch"],
                  2 * results["transformers_offload"]["grad_rel_err_vs_torch"])
    if results["offloaded"]["grad_rel_err_vs_torch"] > allowed:
        raise AssertionError(f"offloaded checkpoint gradients differ from torch's beyond {allowed:.1e}: {results}")
    print(f"gpu_selfcheck: OK (offloaded gradient error <= {allowed:.1e})")
    return results


if __name__ == "__main__":
    gpu_selfcheck()
