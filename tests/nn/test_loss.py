import pytest
import torch
import torch.nn.functional as F

from lowmem.nn.loss import cross_entropy_sum


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
