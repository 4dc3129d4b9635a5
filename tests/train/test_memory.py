import gc

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.testing._internal.two_tensor import TwoTensor

from lowmem.train.memory import LiveTensorTracker, measure_cuda_peak

F32 = 4  # bytes per float32 element


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


def linear_params(n_in: int = 32, n_out: int = 16, batch: int = 4):
    torch.manual_seed(0)
    weight = torch.randn(n_out, n_in, requires_grad=True)
    bias = torch.randn(n_out, requires_grad=True)
    x = torch.randn(batch, n_in)
    return weight, bias, x


def profiler_peak_bytes(fn) -> int:
    """Peak of the CPU allocator's running total while `fn` runs, from torch.profiler's events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    assert events, "the profiler recorded no allocations"
    current = peak = 0
    for _, n_bytes in sorted(events):
        current += n_bytes
        peak = max(peak, current)
    return peak


# -- counting single tensors -----------------------------------------------------------------------


def test_allocation_raises_current_and_peak_by_exactly_its_bytes():
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.empty(1000)
        assert (tracker.current_bytes, tracker.peak_bytes) == (1000 * F32, 1000 * F32)
        b = torch.zeros(3, 5, dtype=torch.bfloat16)
        assert tracker.current_bytes == 1000 * F32 + 3 * 5 * 2
        c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # reaches the mode via lift_fresh
        assert tracker.current_bytes == 1000 * F32 + 3 * 5 * 2 + 3 * 8
    assert tracker.current_by_category() == {"activations": 4000 + 30 + 24}
    del a, b, c


def test_free_lowers_current_but_not_peak():
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.empty(1000)
        b = torch.empty(500)
        del a
        assert tracker.current_bytes == 500 * F32
        assert tracker.peak_bytes == 1500 * F32
    del b
    assert tracker.current_bytes == 0  # frees after the block are still counted
    assert tracker.peak_bytes == 1500 * F32


def test_storage_freed_by_the_cycle_collector_is_subtracted():
    tracker = LiveTensorTracker()
    with tracker:
        cycle = [torch.empty(256)]
        cycle.append(cycle)
        del cycle
        assert tracker.current_bytes == 256 * F32
        gc.collect()
        assert tracker.current_bytes == 0


def test_reused_addresses_are_not_confused():
    tracker = LiveTensorTracker()
    with tracker:
        t = torch.empty(1000)
        for _ in range(50):
            t = torch.empty(1000)  # the old storage dies after the new one exists
        assert tracker.current_bytes == 1000 * F32
        assert tracker.peak_bytes == 2 * 1000 * F32
        assert tracker.snapshot()["n_live_storages"] == 1
    del t


def test_views_share_one_count_and_keep_the_storage_alive():
    tracker = LiveTensorTracker()
    with tracker:
        base = torch.randn(8, 16)
        views = [base[2:], base.t(), base.view(16, 8), *base.split(4), base.unsqueeze(0).expand(3, 8, 16)]
        assert tracker.current_bytes == 8 * 16 * F32
        tail = base[7]
        del base, views
        assert tracker.current_bytes == 8 * 16 * F32  # `tail` still holds the storage
        del tail
        assert tracker.current_bytes == 0


def test_inplace_ops_count_nothing_even_on_tensors_made_before_tracking():
    made_before = torch.randn(100)
    tracker = LiveTensorTracker()
    with tracker:
        made_before.add_(1).mul_(2)
        made_before[:10].zero_()
        torch.exp(made_before, out=made_before)
        assert tracker.current_bytes == 0
        inside = torch.randn(100)
        inside.add_(made_before).exp_()
        assert tracker.current_bytes == 100 * F32
        assert tracker.peak_bytes == 100 * F32


def test_resize_is_counted_and_direct_storage_resize_needs_resync():
    tracker = LiveTensorTracker()
    with tracker:
        t = torch.empty(10)
        t.resize_(1000)  # an op: seen
        assert tracker.current_bytes == 1000 * F32
        t.untyped_storage().resize_(0)  # not an op: seen only after resync
        assert tracker.current_bytes == 1000 * F32
        assert tracker.resync() == -1000 * F32
        assert tracker.current_bytes == 0
        assert tracker.peak_bytes == 1000 * F32


def test_wrapper_subclass_is_counted_through_its_inner_tensors():
    a, b = torch.randn(64), torch.randn(64)
    pair = TwoTensor(a, b)
    tracker = LiveTensorTracker()
    with tracker:
        doubled = pair * 2  # TwoTensor allocates its two inner tensors where the mode cannot see
        assert tracker.current_bytes == 2 * 64 * F32
    del doubled


# -- categories --------------------------------------------------------------------------------------


def test_add_existing_deduplicates_and_reclassify_moves_bytes():
    weight, bias, x = linear_params()
    tracker = LiveTensorTracker()
    added = tracker.add_existing([weight, bias, weight, weight.t(), None], "parameters")
    assert added == (16 * 32 + 16) * F32
    assert tracker.add_existing([weight], "other") == 0  # already tracked: keeps its category
    assert tracker.add_existing([x], "inputs") == 4 * 32 * F32
    assert tracker.peak_bytes == tracker.current_bytes == (16 * 32 + 16 + 4 * 32) * F32

    moved = tracker.reclassify([bias, bias[:2], torch.empty(3)], "frozen")  # untracked: skipped
    assert moved == 16 * F32
    assert tracker.current_by_category() == {
        "parameters": 16 * 32 * F32, "frozen": 16 * F32, "inputs": 4 * 32 * F32}


def test_category_context_labels_new_storages_and_restores_the_default():
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.empty(10)
        with tracker.category("optimizer"):
            b = torch.empty(20)
        c = torch.empty(30)
    assert tracker.current_by_category() == {"activations": 40 * F32, "optimizer": 20 * F32}
    del a, b, c


def test_categories_at_peak_add_up_to_peak_and_reclassify_reaches_the_peak():
    model = tiny_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 32)
    n_param_bytes = sum(p.numel() for p in model.parameters()) * F32
    tracker = LiveTensorTracker()
    tracker.add_existing(model.parameters(), "parameters")
    with tracker:
        model(x).square().mean().backward()
        grads = [p.grad for p in model.parameters()]
        peak_before = tracker.peak_bytes
        assert tracker.reclassify(grads, "gradients") == n_param_bytes
        # The backward-time peak held the gradients: they move there too, the peak does not.
        assert tracker.peak_bytes == peak_before
        assert tracker.peak_by_category()["gradients"] == n_param_bytes
        with tracker.category("optimizer"):
            optimizer.step()
    peak = tracker.peak_by_category()
    assert sum(peak.values()) == tracker.peak_bytes
    # AdamW state: exp_avg and exp_avg_sq per parameter, plus one float32 `step` per parameter.
    n_params = len(list(model.parameters()))
    state_bytes = 2 * n_param_bytes + n_params * F32
    assert tracker.current_by_category()["optimizer"] == state_bytes
    assert peak["parameters"] == n_param_bytes
    assert peak["gradients"] == n_param_bytes
    assert peak["optimizer"] >= state_bytes
    snap = tracker.snapshot()
    assert snap["peak_bytes"] == tracker.peak_bytes
    assert snap["peak_by_category"] == peak
    assert sum(snap["current_by_category"].values()) == snap["current_bytes"]


def test_reset_peak_starts_from_current():
    tracker = LiveTensorTracker()
    with tracker:
        keep = torch.empty(100)
        temp = torch.empty(1000)
        del temp
        assert tracker.peak_bytes == 1100 * F32
        tracker.reset_peak()
        assert tracker.peak_bytes == 100 * F32
        assert tracker.peak_by_category() == {"activations": 100 * F32}
        other = torch.empty(50)
        assert tracker.peak_bytes == 150 * F32
    del keep, other


# -- forward and backward ---------------------------------------------------------------------------


def test_single_linear_forward_backward_peak_matches_hand_count():
    n_in, n_out, batch = 32, 16, 4
    weight, bias, x = linear_params(n_in, n_out, batch)
    tracker = LiveTensorTracker()
    tracker.add_existing([weight, bias], "parameters")
    tracker.add_existing([x], "inputs")
    with tracker:
        loss = F.linear(x, weight, bias).sum()  # the (batch, n_out) output dies after the sum
        assert tracker.current_bytes == (n_out * n_in + n_out + batch * n_in + 1) * F32
        loss.backward()
    # The peak is at the end of backward: parameters, input, the loss, its seed gradient
    # (ones_like, expanded without copying to (batch, n_out)), grad of bias, grad of weight.
    expected = (n_out * n_in + n_out + batch * n_in + 1 + 1 + n_out + n_out * n_in) * F32
    assert tracker.peak_bytes == expected
    # The forward output (batch * n_out) is gone before backward allocates: it never adds up.
    assert tracker.peak_bytes < expected + batch * n_out * F32
    assert tracker.current_bytes == expected - F32  # the seed gradient is freed


def test_backward_started_outside_the_mode_is_not_seen():
    weight, bias, x = linear_params()
    tracker = LiveTensorTracker()
    with tracker:
        loss = F.linear(x, weight, bias).sum()
    loss.backward()
    assert tracker.current_bytes == F32  # only the loss: the gradients were not seen


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_mlp_step_peak_matches_the_allocator_trace(with_optimizer):
    model = tiny_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 32)

    def step():
        model(x).square().mean().backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    expected = profiler_peak_bytes(step)  # relative to what was live before: params, x
    optimizer.state.clear()
    tracker = LiveTensorTracker()
    with tracker:
        step()
    # The mode cannot see scalars made inside a kernel (a wrapped Python number is 8 bytes,
    # a dtype cast of one 4) so it may read a few bytes low, never high.
    assert 0 <= expected - tracker.peak_bytes <= 64
    assert tracker.peak_bytes > 8 * 64 * F32


def test_counts_fake_tensors_for_dry_runs():
    with FakeTensorMode():
        weight, bias, x = linear_params()
        tracker = LiveTensorTracker()
        tracker.add_existing([weight, bias, x], "parameters")
        with tracker:
            F.linear(x, weight, bias).sum().backward()
    assert tracker.peak_bytes == (16 * 32 + 16 + 4 * 32 + 1 + 1 + 16 + 16 * 32) * F32


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_measure_cuda_peak_without_cuda_says_what_to_use():
    with pytest.raises(RuntimeError, match="LiveTensorTracker"):
        measure_cuda_peak(lambda: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tracker_agrees_with_the_allocator():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
    x = torch.randn(64, 256, device="cuda")

    def step():
        model(x).square().mean().backward()  # backward runs on the CUDA device thread

    step()  # warm up: cuBLAS takes its workspace from the caching allocator once
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    tracker = LiveTensorTracker()
    tracker.add_existing([*model.parameters(), x], "parameters")
    existing = tracker.current_bytes

    def tracked_step():
        with tracker:
            step()

    peak = measure_cuda_peak(tracked_step)
    n_param_bytes = sum(p.numel() for p in model.parameters()) * F32
    assert tracker.current_by_category()["activations"] >= n_param_bytes  # gradients were seen
    # The caching allocator rounds blocks up to 512 bytes; beyond that the two should agree.
    assert abs(peak - (before + tracker.peak_bytes - existing)) <= 0.05 * peak


def test_backward_category_counts_a_functions_backward_under_its_category():
    # log_softmax's backward makes (N, V) tensors after the forward's `category` block has ended
    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(8, 512)
    tracker = LiveTensorTracker()
    with tracker:
        x = h * 2  # an activation, before the loss
        with tracker.category("logits"):
            loss = F.log_softmax(x @ w, dim=-1).sum()
        tracker.backward_category(loss, x, "logits")
        loss.backward()
        after = torch.ones(4)  # made once the loss's backward has left: the default again
        peak = tracker.peak_by_category()
    assert tracker._category == "activations"
    n_v = 64 * 512 * 4
    # at the peak: log_softmax's saved output (forward) and its gradient's result (backward), both the loss's
    assert peak["logits"] >= 2 * n_v and peak.get("activations", 0) < n_v
    without = LiveTensorTracker()
    with without:
        x = h * 2
        with without.category("logits"):
            loss = F.log_softmax(x @ w, dim=-1).sum()
        loss.backward()
    assert without.peak_by_category()["activations"] >= n_v  # the backward's (N, V) result, mislabelled
    del after
