"""Activation offloading: which saved tensors move, the host budget, unchanged gradients, and (CUDA) memory.

On a CPU `ActivationOffload("cpu", ...)` runs the same pack/unpack bookkeeping with plain host copies and no
stream. That checks which tensors move and that the gradients are bit-identical, but it frees nothing (the
activations are in host memory already). The memory effect and the stream code run only in the CUDA tests,
which are skipped without a GPU.
"""

import contextlib

import msgspec
import pytest
import torch

from lowmem.nn import forward, init_params
from lowmem.nn.config import ModelConfig, preset
from lowmem.nn.llama import block, block_param_names, rope_cache
from lowmem.plan import plan
from lowmem.plan.estimate import OFFLOAD_MIN_BYTES
from lowmem.plan.structs import Strategies
from lowmem.train import strategies as strategies_module
from lowmem.train.memory import LiveTensorTracker
from lowmem.train.offload import ActivationOffload
from lowmem.train.session import build_training
from lowmem.train.strategies import block_runner, param_dtype

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: offloading moves tensors off a GPU")
UNBOUNDED = 1 << 50


def _params(cfg: ModelConfig, device: str = "cpu") -> dict[str, torch.Tensor]:
    params = {n: t.to(device) for n, t in init_params(cfg, seed=0).items()}
    for t in params.values():
        t.requires_grad_(True)
    return params


def _inputs(cfg: ModelConfig, B: int, T: int, device: str = "cpu"):
    """Tokens, positions and document ids (two documents per row) of a (B, T) batch."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    doc_ids = torch.zeros(B, T, dtype=torch.int64)
    doc_ids[:, T // 2:] = 1
    positions = torch.arange(T).expand(B, T).contiguous()
    return tokens.to(device), positions.to(device), doc_ids.to(device)


def _recording(made: list, **settings):
    """A factory of `ActivationOffload`s over a run's params (`keep`), each appended to `made`."""

    def make(params):
        made.append(ActivationOffload(keep=params.values(), **settings))
        return made[-1]

    return make


def _runner(checkpointing: str, params=None):
    """lowmem's block seam for `checkpointing` (fp32): a plain call when it is off."""
    strategies = Strategies(precision="fp32", activation_checkpointing=checkpointing, cross_entropy="standard")
    return block_runner(strategies, params) or (lambda block_fn, *args: block_fn(*args))


def _grads(cfg, checkpointing: str, offload, B: int = 2, T: int = 64, device: str = "cpu"):
    """Loss and gradients of a sum-of-squares loss on the hidden states, the forward under `offload(params)`."""
    params = _params(cfg, device)
    tokens, positions, doc_ids = _inputs(cfg, B, T, device)
    run = _runner(checkpointing, params)
    with offload(params) if offload else contextlib.nullcontext():
        hidden = forward(params, tokens, cfg, positions=positions, doc_ids=doc_ids, run_block=run)
    loss = hidden.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in params.items() if t.grad is not None}


# -- what moves ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", ["off", "full", "selective", "every-2"])
def test_gradients_are_bit_identical_with_offloading(checkpointing):
    cfg = preset("tiny")
    seen = []
    loss, grads = _grads(cfg, checkpointing, None)
    loss_off, grads_off = _grads(cfg, checkpointing, _recording(seen, device="cpu", min_bytes=1024,
                                                                max_host_bytes=UNBOUNDED))
    assert seen[0].n_moved > 0  # it really went through the host copies
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_off[name]), name


def _one_block(checkpointing: str, min_bytes: int):
    """Run one tiny block under offloading; return the offloader and the block input's bytes."""
    cfg = preset("tiny")
    params = _params(cfg)
    B, T = 2, 64
    cos, sin = rope_cache(cfg, torch.arange(T).expand(B, T))
    weights = [params[f"layers.0.{n}"] for n in block_param_names(cfg)]
    run = _runner(checkpointing)
    h = torch.randn(B, T, cfg.dim, requires_grad=True)
    offload = ActivationOffload("cpu", min_bytes=min_bytes, max_host_bytes=UNBOUNDED, keep=params.values())
    with offload:
        out = run(lambda *a: block(*a, cfg=cfg), h, *weights, cos, sin, None)
    out.sum().backward()
    return offload, h.numel() * h.element_size()


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_with_checkpointing_only_the_block_input_moves(checkpointing):
    # (B, T, D) fp32 is the threshold: the (B, T, head_dim) RoPE tables and every weight are smaller or kept
    offload, input_bytes = _one_block(checkpointing, min_bytes=2 * 64 * 64 * 4)
    assert offload.n_moved == 1 and offload.host_bytes == input_bytes


def test_without_checkpointing_the_block_saves_and_moves_much_more():
    offload, input_bytes = _one_block("off", min_bytes=2 * 64 * 64 * 4)
    assert offload.n_moved > 4 and offload.host_bytes > 4 * input_bytes


def test_the_size_threshold_keeps_small_tensors():
    none, _ = _one_block("off", min_bytes=UNBOUNDED)
    some, _ = _one_block("off", min_bytes=2 * 64 * 64 * 4)
    every, _ = _one_block("off", min_bytes=0)
    assert none.n_moved == 0 and none.host_bytes == 0
    assert 0 < some.n_moved < every.n_moved  # the fp32 norm statistics and RoPE tables are under the threshold


def test_the_host_budget_bounds_what_moves_and_changes_no_gradient():
    cfg = preset("tiny")
    unbounded, bounded = [], []
    _grads(cfg, "off", _recording(unbounded, device="cpu", min_bytes=0, max_host_bytes=UNBOUNDED))
    budget = unbounded[0].host_bytes // 3
    loss, grads = _grads(cfg, "off", _recording(bounded, device="cpu", min_bytes=0, max_host_bytes=budget))
    assert 0 < bounded[0].host_bytes <= budget < unbounded[0].host_bytes
    ref_loss, ref = _grads(cfg, "off", None)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref[n]) for n in ref)


def test_parameters_and_their_views_stay_on_the_device():
    w = torch.randn(64, 256, requires_grad=True)  # linear saves w.t(), a view: matched by its storage
    x = torch.randn(32, 256, requires_grad=True)
    for keep, moved in (([w], x.numel() * 4), ([], x.numel() * 4 + w.numel() * 4)):
        offload = ActivationOffload("cpu", min_bytes=0, max_host_bytes=UNBOUNDED, keep=keep)
        with offload:
            y = torch.nn.functional.linear(x, w)
        assert offload.host_bytes == moved
        y.sum().backward()


def test_a_tensor_saved_twice_moves_once():
    x = torch.randn(1024, requires_grad=True)
    offload = ActivationOffload("cpu", min_bytes=0, max_host_bytes=UNBOUNDED, keep=[x])
    with offload:
        a = (x * 2).relu()  # relu saves its output a ...
        b = a.sin()  # ... and sin saves its input: the same tensor
    assert offload.n_moved == 1 and offload.host_bytes == a.numel() * 4
    b.sum().backward()
    assert torch.equal(x.grad, 2 * (x > 0) * a.cos())


def test_each_forward_gets_its_own_budget():
    offload = ActivationOffload("cpu", min_bytes=0, max_host_bytes=8192, keep=[])
    for n in (1024, 512, 1024):  # entered once per forward, as the executor does
        x = torch.randn(n, requires_grad=True)
        with offload:
            y = (x * 2).relu().sin().exp()  # relu's output (saved twice) and exp's: 4 n bytes each
        assert offload.n_moved == 2 and offload.host_bytes == 8 * n
        y.sum().backward()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without a CUDA runtime")
def test_a_cuda_offloader_builds_without_a_cuda_runtime():
    """On fake CUDA (a torch built without CUDA) there are no streams: the offloader for "cuda" copies plainly,
    and moves fake tensors made on "cuda" (device cuda:0); tests/train/test_cuda_optim.py runs it."""
    offload = ActivationOffload("cuda", min_bytes=0, max_host_bytes=UNBOUNDED)
    assert offload.device == torch.device("cuda", 0)
    assert type(offload._copier).__name__ == "_PlainCopier"


# -- the executor applies it from the plan ---------------------------------------------------------------


class _Recorded(ActivationOffload):
    made: list["_Recorded"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorded.made.append(self)


@pytest.mark.parametrize("planned", [False, True])
def test_the_executor_offloads_only_what_the_plan_says(tiny_spec, monkeypatch, planned):
    """A CPU plan never offloads; with the field set as a CUDA plan would set it, the same bookkeeping runs on
    CPU tensors inside `loss_of`, and the loss and gradients do not change."""
    monkeypatch.setattr(strategies_module, "ActivationOffload", _Recorded)
    monkeypatch.setattr(_Recorded, "made", [])
    p = plan(tiny_spec("memory.strategies.activation_checkpointing=on"), "cpu")
    assert not p.strategies.activation_offloading
    if planned:
        p = msgspec.structs.replace(p, strategies=msgspec.structs.replace(
            p.strategies, activation_offloading=True, offload_min_bytes=4096, offload_max_host_bytes=UNBOUNDED))
    batch = {k: t for k, t in zip(("tokens", "positions", "doc_ids"), _inputs(p.model, 4, 128), strict=True)}
    batch["labels"] = batch["tokens"].roll(-1, dims=1)
    results = []
    for strategies in (msgspec.structs.replace(p.strategies, activation_offloading=False), p.strategies):
        run = build_training(msgspec.structs.replace(p, strategies=strategies),
                             init_params(p.model, seed=0, dtype=param_dtype(p.strategies)), LiveTensorTracker())
        loss, _ = run.loss_of(batch)
        loss.backward()
        results.append((loss.detach(), {n: t.grad for n, t in run.trainable_params.items()}))
    assert len(_Recorded.made) == int(planned)
    if planned:
        made = _Recorded.made[0]
        assert (made.min_bytes, made.max_host_bytes) == (4096, UNBOUNDED)
        # full checkpointing: the block inputs (and the final norm's tensors) moved
        assert made.host_bytes >= p.model.n_layers * 4 * 128 * p.model.dim * 4
    (loss, grads), (loss_off, grads_off) = results
    assert torch.equal(loss, loss_off) and all(torch.equal(grads[n], grads_off[n]) for n in grads)


# -- CUDA: the memory effect ----------------------------------------------------------------------------

# 48 narrow blocks over 32,768 tokens: each block input is (16, 2048, 512) fp32 = 64 MiB, so the 48 checkpointed
# inputs (3 GiB) outweigh one recomputed block (about 14 inputs' worth) and the 350 MB of weights and gradients
DEEP = ModelConfig(vocab_size=1024, dim=512, n_layers=48, n_heads=8, n_kv_heads=8, ffn_dim=512)


def _cuda_activation_peak(offloaded: bool) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Peak bytes a checkpointed forward and backward of DEEP allocate beyond its weights and batch."""
    params = _params(DEEP, "cuda")
    tokens, positions, _ = _inputs(DEEP, 16, 2048, "cuda")  # plain causal attention: no (T, T) mask per block
    run = _runner("full", params)
    offload = ActivationOffload("cuda", min_bytes=OFFLOAD_MIN_BYTES, max_host_bytes=UNBOUNDED,
                                keep=params.values())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with offload if offloaded else contextlib.nullcontext():
        hidden = forward(params, tokens, DEEP, positions=positions, run_block=run)
    loss = hidden.pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    if offloaded:
        assert offload.n_moved >= DEEP.n_layers  # every block input went to the host
    return torch.cuda.max_memory_allocated() - base, loss.detach(), {n: t.grad for n, t in params.items()}


@cuda
def test_cuda_offloading_lowers_the_peak_by_a_third_and_keeps_the_gradients():
    """Expected: without offloading about 3 GiB of block inputs plus one recomputed block (~0.9 GiB) and the
    gradients; with it about two block inputs instead of 48. Asserted: at least 1/3 lower. Gradients within
    1e-4 relative (CUDA attention backward need not be bitwise deterministic), the loss exactly."""
    plain, loss, grads = _cuda_activation_peak(offloaded=False)
    moved, loss_off, grads_off = _cuda_activation_peak(offloaded=True)
    assert moved < (2 / 3) * plain, (moved, plain)
    assert torch.equal(loss, loss_off)
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=1e-4, atol=1e-6)


@cuda
@pytest.mark.parametrize("checkpointing", ["off", "full"])
def test_cuda_streams_bring_back_exact_values(checkpointing):
    """Every saved tensor round-trips through pinned memory on the side stream (threshold 0): a missing wait
    would hand backward a buffer before its copy landed, and the gradients would differ."""
    cfg = msgspec.structs.replace(preset("tiny"), n_layers=4)
    loss, grads = _grads(cfg, checkpointing, None, B=8, T=512, device="cuda")
    loss_off, grads_off = _grads(cfg, checkpointing, _recording([], device="cuda", min_bytes=0,
                                                                max_host_bytes=UNBOUNDED), B=8, T=512, device="cuda")
    assert torch.equal(loss, loss_off)
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=1e-4, atol=1e-6)
