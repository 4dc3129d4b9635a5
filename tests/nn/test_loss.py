import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lowmem.nn.loss as loss_mod
from lowmem.nn.loss import (
    CE_IMPLEMENTATIONS,
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    default_chunk_tokens,
    fused_linear_cross_entropy_sum,
    loss_peak_bytes,
)
from lowmem.train.memory import LiveTensorTracker


def make(N=12, D=8, V=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, labels


def test_matches_torch_cross_entropy_with_ignored_tokens():
    hidden, weight, labels = make()
    labels[[0, 3, 7]] = -100
    loss_sum, n = cross_entropy_sum(hidden, weight, labels)
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="none")[labels != -100].sum()
    assert n.item() == 9 and loss_sum.dtype == torch.float32 and loss_sum.ndim == 0
    torch.testing.assert_close(loss_sum, ref)


def test_custom_ignore_index():
    hidden, weight, labels = make()
    labels[:4] = 5
    loss_sum, n = cross_entropy_sum(hidden, weight, labels, ignore_index=5)
    assert n.item() == (labels != 5).sum().item()
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=5, reduction="sum")
    torch.testing.assert_close(loss_sum, ref)


def test_batched_shape_equals_flat():
    hidden, weight, labels = make(N=12)
    flat = cross_entropy_sum(hidden, weight, labels)
    batched = cross_entropy_sum(hidden.view(3, 4, -1), weight, labels.view(3, 4))
    assert torch.equal(flat[0], batched[0]) and torch.equal(flat[1], batched[1])


def test_all_ignored_gives_zero_sum_and_count():
    hidden, weight, labels = make()
    loss_sum, n = cross_entropy_sum(hidden, weight, torch.full_like(labels, -100))
    assert loss_sum.item() == 0.0 and n.item() == 0


def test_low_precision_inputs_compute_logits_in_fp32():
    hidden, weight, labels = make(V=3000, D=64)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    loss_sum, _ = cross_entropy_sum(h16, w16, labels)
    assert loss_sum.dtype == torch.float32
    ref = F.cross_entropy(h16.float() @ w16.float().T, labels, reduction="sum")
    torch.testing.assert_close(loss_sum, ref, atol=1e-4, rtol=1e-6)


def test_gradients_flow_to_hidden_and_weight():
    hidden, weight, labels = make()
    hidden.requires_grad_(), weight.requires_grad_()
    cross_entropy_sum(hidden, weight, labels)[0].backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.cross_entropy(ref_h @ ref_w.T, labels, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)


def test_shape_errors():
    hidden, weight, labels = make()
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_sum(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="weight"):
        cross_entropy_sum(hidden, weight[:, :-1], labels)


# -- chunked and fused: drop-in parity ---------------------------------------------------------

ALTERNATIVES = ["chunked", "fused"]
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_batch(N, D, V, frac_ignored=0.0, dtype=torch.float32, seed=0):
    """hidden (N, D) and weight (V, D) at a realistic scale (logits ~ N(0, 1)), labels with ignores."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < frac_ignored] = -100
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, **kwargs):
    """(loss_sum, n_tokens, hidden.grad, weight.grad) of mean CE, so backward gets a grad_output != 1."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_sum, n = fn(h, w, labels, **kwargs)
    (loss_sum / n.clamp(min=1)).backward()
    return loss_sum.detach(), n, h.grad, w.grad


@pytest.mark.parametrize("kind", ALTERNATIVES)
@pytest.mark.parametrize("N,frac_ignored", [(64, 0.0), (64, 0.3), (37, 0.0), (53, 0.3)])
def test_alternatives_match_standard_fp32(kind, N, frac_ignored):
    # 37 and 53 tokens split unevenly into 8 chunks (chunked) and into chunks of 4 (fused).
    hidden, weight, labels = make_batch(N, 16, 300, frac_ignored)
    kwargs = {"n_chunks": 8} if kind == "chunked" else {"chunk_tokens": 4}
    got = loss_and_grads(CE_IMPLEMENTATIONS[kind], hidden, weight, labels, **kwargs)
    ref = loss_and_grads(cross_entropy_sum, hidden, weight, labels)
    assert got[1].dtype == torch.int64 and got[1].item() == ref[1].item() == (labels != -100).sum()
    assert got[0].dtype == torch.float32 and got[0].ndim == 0
    for a, b in zip(got[2:], ref[2:], strict=True):
        torch.testing.assert_close(a, b, **FP32_TOL)
    torch.testing.assert_close(got[0], ref[0], **FP32_TOL)


@pytest.mark.parametrize("kind", ALTERNATIVES)
def test_alternatives_accept_batched_shape_and_custom_ignore_index(kind):
    hidden, weight, labels = make_batch(24, 16, 100)
    labels[:5] = 7
    flat = loss_and_grads(CE_IMPLEMENTATIONS[kind], hidden, weight, labels, ignore_index=7)
    batched = loss_and_grads(CE_IMPLEMENTATIONS[kind], hidden.view(4, 6, 16), weight, labels.view(4, 6),
                             ignore_index=7)
    ref = loss_and_grads(cross_entropy_sum, hidden, weight, labels, ignore_index=7)
    assert batched[2].shape == (4, 6, 16) and batched[1].item() == ref[1].item()
    torch.testing.assert_close(batched[2].view(24, 16), ref[2], **FP32_TOL)
    for a, b in zip((batched[0], batched[3]), (flat[0], flat[3]), strict=True):
        torch.testing.assert_close(a, b, **FP32_TOL)
    torch.testing.assert_close(flat[0], ref[0], **FP32_TOL)


@pytest.mark.parametrize("kind", ALTERNATIVES)
def test_alternatives_match_standard_bf16(kind):
    # Stated tolerance: the loss agrees to fp32 accuracy (logits are fp32 everywhere); gradients
    # within 2e-2 of the largest reference entry, about 2.5 bf16 epsilons (2^-7): chunked sums the
    # chunks' weight gradients in bf16, fused rounds a gradient to bf16 before scaling it by 1/n.
    hidden, weight, labels = make_batch(200, 32, 500, 0.3, torch.bfloat16)
    got = loss_and_grads(CE_IMPLEMENTATIONS[kind], hidden, weight, labels)
    ref = loss_and_grads(cross_entropy_sum, hidden, weight, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(got[2:], ref[2:], strict=True):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


@pytest.mark.parametrize("kind", ALTERNATIVES)
def test_tied_weight_gradient_adds_embedding_and_output_terms(kind):
    g = torch.Generator().manual_seed(1)
    V, D, N = 50, 16, 29
    weight0 = torch.randn(V, D, generator=g) / D**0.5
    mix = torch.randn(D, D, generator=g) / D**0.5
    ids = torch.randint(0, V, (N,), generator=g)
    labels = torch.roll(ids, -1)
    labels[-1] = -100

    def weight_grad(fn):
        weight = weight0.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, weight) @ mix)  # the same weight embeds and projects
        fn(hidden, weight, labels)[0].backward()
        return weight.grad

    torch.testing.assert_close(weight_grad(CE_IMPLEMENTATIONS[kind]), weight_grad(cross_entropy_sum), **FP32_TOL)


@pytest.mark.parametrize("kind", sorted(CE_IMPLEMENTATIONS))
def test_all_ignored_gives_zero_loss_count_and_gradients(kind):
    hidden, weight, labels = make_batch(12, 8, 20)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss_sum, n = CE_IMPLEMENTATIONS[kind](h, w, torch.full_like(labels, -100))
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and n.item() == 0 and n.dtype == torch.int64
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_chunk_count_changes_no_numbers():
    hidden, weight, labels = make_batch(45, 16, 200, 0.3)
    ref = loss_and_grads(cross_entropy_sum, hidden, weight, labels)
    for n_chunks in (1, 3, 100):
        got = loss_and_grads(chunked_cross_entropy_sum, hidden, weight, labels, n_chunks=n_chunks)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, **FP32_TOL)
    for chunk_tokens in (1, 5, None, 10**6):
        got = loss_and_grads(fused_linear_cross_entropy_sum, hidden, weight, labels, chunk_tokens=chunk_tokens)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, **FP32_TOL)


def test_fused_with_frozen_weight_and_without_grad():
    hidden, weight, labels = make_batch(30, 16, 100, 0.3)
    ref = loss_and_grads(cross_entropy_sum, hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    loss_sum, _ = fused_linear_cross_entropy_sum(h, weight, labels)  # weight frozen (e.g. LoRA)
    (loss_sum / ref[1]).backward()
    torch.testing.assert_close(h.grad, ref[2], **FP32_TOL)
    assert weight.grad is None
    with torch.no_grad():
        loss_nograd, n = fused_linear_cross_entropy_sum(hidden.requires_grad_(), weight, labels)
    assert loss_nograd.grad_fn is None and n.item() == ref[1].item()
    torch.testing.assert_close(loss_nograd, ref[0], **FP32_TOL)


def test_fused_refuses_a_second_backward():
    hidden, weight, labels = make_batch(8, 4, 10)
    loss_sum, _ = fused_linear_cross_entropy_sum(hidden.requires_grad_(), weight, labels)
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss_sum.backward()


def test_default_chunk_tokens_makes_a_tile_about_the_size_of_the_hidden_states():
    assert default_chunk_tokens(1024, 8192, 64) == 8  # N * D / V exactly a power of two
    assert default_chunk_tokens(1000, 8000, 24) == 4  # 3 rounds up
    assert default_chunk_tokens(3, 128256, 4096) == 1  # never 0
    for n, v, d in [(8192, 128256, 4096), (777, 5000, 96), (64, 100, 512)]:
        c = default_chunk_tokens(n, v, d)
        assert c & (c - 1) == 0 and n * d <= 2 * c * v and c * v < 2 * max(n * d, v)


def test_alternatives_check_arguments():
    hidden, weight, labels = make_batch(12, 8, 20)
    for fn in (chunked_cross_entropy_sum, fused_linear_cross_entropy_sum):
        with pytest.raises(ValueError, match="labels"):
            fn(hidden, weight, labels[:-1])
        with pytest.raises(ValueError, match="weight"):
            fn(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="n_chunks"):
        chunked_cross_entropy_sum(hidden, weight, labels, n_chunks=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="kind"):
        loss_peak_bytes("flash", 8, 20, 8, 4)
    with pytest.raises(ValueError, match="n_kept"):
        loss_peak_bytes("fused", 8, 20, 8, 4, n_kept=9)


# -- measured memory -----------------------------------------------------------------------------


def measured_peak_bytes(kind, hidden, weight, labels):
    """Peak live bytes of forward + backward beyond the inputs, as `LiveTensorTracker` counts them."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tracker = LiveTensorTracker()
    input_bytes = tracker.add_existing([h, w, labels], "inputs")
    with tracker:
        loss_sum, n = CE_IMPLEMENTATIONS[kind](h, w, labels)
        loss_sum.backward()
    return tracker.peak_bytes - input_bytes, n.item()


def test_chunked_and_fused_hold_a_fraction_of_the_standard_peak():
    N, D, V = 1024, 64, 8192  # fp32 logits 32 MiB, hidden 256 KiB, weight 2 MiB: logits dominate
    hidden, weight, labels = make_batch(N, D, V)
    peak = {kind: measured_peak_bytes(kind, hidden, weight, labels)[0] for kind in CE_IMPLEMENTATIONS}
    assert peak["chunked"] < peak["standard"] / 3, peak  # 8 chunks: the logits part is 8x smaller
    assert peak["fused"] < peak["standard"] / 4, peak  # one 8-token tile instead of 3 full logits
    for kind, measured in peak.items():
        predicted = loss_peak_bytes(kind, N, V, D, 4)
        assert abs(predicted - measured) <= 0.1 * measured, (kind, predicted, measured)


@pytest.mark.parametrize("kind", sorted(CE_IMPLEMENTATIONS))
@pytest.mark.parametrize("N,D,V,dtype,frac_ignored", [
    (256, 64, 2048, torch.bfloat16, 0.3),  # logits dominate, low precision, ignored tokens
    (16, 64, 4096, torch.float32, 0.0),  # the weight dominates: the peak is at its gradient
])
def test_loss_peak_bytes_predicts_the_measured_peak(kind, N, D, V, dtype, frac_ignored):
    hidden, weight, labels = make_batch(N, D, V, frac_ignored, dtype)
    measured, n_kept = measured_peak_bytes(kind, hidden, weight, labels)
    predicted = loss_peak_bytes(kind, N, V, D, dtype.itemsize, n_kept)
    assert abs(predicted - measured) <= 0.1 * measured, (predicted, measured)


def test_all_implementations_are_registered():
    assert CE_IMPLEMENTATIONS == {"standard": cross_entropy_sum, "chunked": chunked_cross_entropy_sum,
                                  "fused": fused_linear_cross_entropy_sum}
    assert set(loss_mod.__all__) >= {"CE_IMPLEMENTATIONS", "loss_peak_bytes", "chunked_cross_entropy_sum",
                                     "fused_linear_cross_entropy_sum"}


# -- projection in bf16 --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CE_IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bf16_projection_matches_the_fp32_projection(kind, dtype, softcap):
    # Stated tolerance: the summed loss within 5e-4 relative (the logits are rounded to bf16 once, about 2^-9,
    # and the errors average out over tokens); gradients within 2e-2 of the largest reference entry, as
    # test_alternatives_match_standard_bf16 (measured: up to 9e-3, fused summing its chunks' weight gradients
    # in bf16 as Liger does). Gradients arrive in the inputs' dtype, fp32 inputs included.
    hidden, weight, labels = make_batch(200, 32, 500, 0.3, dtype)
    fn = CE_IMPLEMENTATIONS[kind]
    ref = loss_and_grads(fn, hidden, weight, labels, softcap=softcap)
    got = loss_and_grads(fn, hidden, weight, labels, softcap=softcap, projection_dtype=torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[1].item() == ref[1].item()
    assert (got[0] - ref[0]).abs() <= 5e-4 * ref[0].abs()
    for a, b in zip(got[2:], ref[2:], strict=True):
        assert a.dtype == dtype
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    default = loss_and_grads(fn, hidden, weight, labels, softcap=softcap, projection_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(default, ref, strict=True))  # None is fp32


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matmul's operands and every fp32 output of the given shapes."""

    def __init__(self, shapes) -> None:
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.matmul_dtypes: set[torch.dtype] = set()
        self.fp32_copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.matmul_dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) in self.shapes:
            self.fp32_copies.append(f"{func} {tuple(out.shape)}")
        return out


@pytest.mark.parametrize("kind", sorted(CE_IMPLEMENTATIONS))
def test_bf16_projection_multiplies_in_bf16_without_fp32_copies(kind):
    N, D, V = 64, 32, 300
    hidden, weight, labels = make_batch(N, D, V, 0.0, torch.bfloat16)
    for projection, dtypes in ((None, {torch.float32}), (torch.bfloat16, {torch.bfloat16})):
        seen = _MatmulDtypes([(N, D), (V, D)])
        with seen:
            loss_and_grads(CE_IMPLEMENTATIONS[kind], hidden, weight, labels, projection_dtype=projection)
        assert seen.matmul_dtypes == dtypes, (projection, seen.matmul_dtypes)
        assert bool(seen.fp32_copies) == (projection is None), seen.fp32_copies  # the check sees them


def test_projection_dtype_is_checked():
    hidden, weight, labels = make()
    for fn in CE_IMPLEMENTATIONS.values():
        with pytest.raises(ValueError, match="projection_dtype=torch.int8"):
            fn(hidden, weight, labels, projection_dtype=torch.int8)
    with pytest.raises(ValueError, match="projection_bytes=1"):
        loss_peak_bytes("fused", 8, 20, 8, 2, projection_bytes=1)


def measured_projection_peak_bytes(kind, hidden, weight, labels, projection_dtype, weight_grad):
    """`measured_peak_bytes` with a projection dtype and, optionally, a frozen weight."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    tracker = LiveTensorTracker()
    input_bytes = tracker.add_existing([h, w, labels], "inputs")
    with tracker:
        loss_sum, n = CE_IMPLEMENTATIONS[kind](h, w, labels, projection_dtype=projection_dtype)
        loss_sum.backward()
    return tracker.peak_bytes - input_bytes, n.item()


@pytest.mark.parametrize("kind", sorted(CE_IMPLEMENTATIONS))
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("N,D,V,dtype,frac_ignored", [
    (256, 64, 2048, torch.bfloat16, 0.3),  # logits dominate, ignored tokens
    (16, 64, 4096, torch.bfloat16, 0.0),  # the weight dominates
    (256, 64, 2048, torch.float32, 0.0),  # fp32 inputs (mixed precision's head) cast to bf16
    (16, 64, 4096, torch.float32, 0.0),
])
def test_loss_peak_bytes_predicts_the_measured_peak_of_a_bf16_projection(kind, weight_grad, N, D, V, dtype,
                                                                         frac_ignored):
    hidden, weight, labels = make_batch(N, D, V, frac_ignored, dtype)
    measured, n_kept = measured_projection_peak_bytes(kind, hidden, weight, labels, torch.bfloat16, weight_grad)
    predicted = loss_peak_bytes(kind, N, V, D, dtype.itemsize, n_kept, weight_grad=weight_grad,
                                projection_bytes=2)
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


def test_bf16_projection_of_bf16_inputs_holds_less_than_the_fp32_projection():
    N, D, V = 1024, 64, 8192
    hidden, weight, labels = make_batch(N, D, V, 0.0, torch.bfloat16)
    peak = {(kind, p): measured_projection_peak_bytes(kind, hidden, weight, labels, p, True)[0]
            for kind in CE_IMPLEMENTATIONS for p in (None, torch.bfloat16)}
    # fused: no fp32 weight copy and a bf16 accumulator instead of an fp32 one (measured 4.60 -> 1.58 MB)
    assert peak["fused", torch.bfloat16] < 0.4 * peak["fused", None], peak
    for kind in ("standard", "chunked"):  # the fp32 logits dominate; the fp32 copies are gone
        assert peak[kind, torch.bfloat16] < peak[kind, None], peak
