"""Optimizers and activation offloading on CUDA parameters, proven on fake CUDA (`lowmem.fakecuda`).

The checks run in child processes (tests/train/cuda_optim_cases.py): one for the optimizers, one for offloading,
each result shared by the tests that read it. The memory figures are live storage bytes of fake tensors, counted
as `LiveTensorTracker` counts them: what a kernel allocates and frees inside one op (a fused kernel's registers,
a workspace) is not seen, and neither is torch's foreach path's inside one `_foreach_*` op; the temporaries
compared here are whole tensors between ops.
"""

import pytest

from lowmem import fakecuda

CASES = "tests/train/cuda_optim_cases.py"
N_LAYERS = 5

pytestmark = pytest.mark.skipif(not fakecuda.is_needed(), reason="fake CUDA is for a torch built without CUDA; "
                                "a CUDA torch runs the GPU tests instead")


@pytest.fixture(scope="module")
def optimizers() -> dict:
    return fakecuda.run(f"{CASES}:optimizers", N_LAYERS)


@pytest.fixture(scope="module")
def offloading() -> dict:
    return fakecuda.run(f"{CASES}:offload_saved_bytes", 256)


# -- fused and per-tensor updates -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_adamw_and_sgd_run_fused_on_cuda_and_their_update_allocates_nothing(optimizers, name):
    """Eight (512, 512) bf16 weights and a bias (4 MiB). torch's foreach path (its default on a GPU) allocates a
    temporary the size of all the parameters in the update (weight decay, then the step); the fused kernel
    updates in place. Measured (second step, states made): foreach +4,195,328 bytes, fused 0."""
    peaks = optimizers["step_peaks"]
    built = peaks[name]
    assert built["fused"] is True
    assert built["lowmem"][1] == 0, built
    assert built["foreach"][1] >= peaks["param_bytes"], built
    assert built["lowmem"][0] < built["foreach"][0]  # the first step: the states, plus foreach's temporary


def test_adafactor_steps_per_tensor_on_cuda(optimizers):
    """torch's Adafactor has no fused kernel. Its foreach path allocates an update the size of all the
    parameters; the per-tensor path (`foreach=False`) about twice the largest one (its update and the norm's
    fp32 upcast). Measured: foreach +4,195,328 bytes, per-tensor +1,050,626 (2 x 512 KiB)."""
    peaks = optimizers["step_peaks"]
    built = peaks["adafactor"]
    assert built["foreach_flag"] is False and not built["fused"]
    assert built["lowmem"][1] <= 2 * peaks["largest_bytes"] + 4096, built
    assert built["foreach"][1] >= peaks["param_bytes"], built


# -- low-bit and host optimizers on fake parameters -------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw8bit-bnb", "adamw8bit-bnb-paged", "adamw8bit-torchao", "adamw4bit-torchao",
                                  "stochastic-rounding"])
def test_low_bit_optimizers_build_their_states_on_fake_cuda(optimizers, name):
    """bitsandbytes (plain and paged, with a weight past its paging threshold) and torchao build their states on
    the parameters' device, to the byte the planner estimates. bitsandbytes' quantization maps are fake copies
    made for the device; torchao keeps its 0-d `step` on the host by design (its compiled update reads it)."""
    result = optimizers["low_bit"][name]
    assert "error" not in result, result["error"]
    assert result["bytes"] == result["predicted"]
    assert "cuda:0" in result["devices"]
    if "bnb" in name:
        assert result["devices"] == ["cuda:0"]


def test_the_host_optimizer_on_fake_cuda_is_a_clear_error(optimizers):
    """torchao's CPUOffloadOptimizer calls the CUDA runtime (streams, events) with no seam to replace: it stops
    with the reason and what to do, not with torchao's bare assertion."""
    error = optimizers["low_bit"]["offload"]["error"]
    assert error.startswith("NotImplementedError: optimizer.offload = true cannot run on fake CUDA"), error
    assert "lowmem.train.dryrun" in error


# -- optimizer in backward: no host read per parameter -----------------------------------------------------


def test_optimizer_in_backward_reads_the_device_once_per_step(optimizers):
    """Five parameters stepped by fused AdamW in their backward hooks: no `.item()` during backward (the squared
    norms add up on the device), one when the loop reads the norm; two steps (the first makes the states)."""
    result = optimizers["in_backward"]
    assert result["counts"] == [0, 1, 0, 1]
    assert result["fused"] and result["n_states"] == N_LAYERS
    assert result["grads_left"] == 0  # each hook freed its gradient


# -- activation offloading --------------------------------------------------------------------------------


def test_offloading_on_fake_cuda_moves_the_saved_activations_off_the_device(offloading):
    """A fully checkpointed 6-layer tiny Llama at (2, 256): without offloading the six block inputs (128 KiB
    each) and the final norm's tensors stay on `cuda` for backward; with it they are on the host and what stays
    is the output. Measured: 1,247,236 bytes on cuda after forward, 131,076 with offloading (1,120,256 on the
    host). Backward still gives every trained tensor a gradient on cuda."""
    plain, moved = offloading["plain"], offloading["offloaded"]
    n_layers, block_input = offloading["n_layers"], offloading["block_input_bytes"]
    assert moved["n_moved"] >= n_layers
    assert plain["cuda_after_forward"] - moved["cuda_after_forward"] >= n_layers * block_input
    assert moved["cuda_after_forward"] < plain["cuda_after_forward"] / 4, (plain, moved)
    assert moved["host_after_forward"] == moved["host_bytes"] >= n_layers * block_input
    assert plain["host_after_forward"] == 0
    assert plain["grad_devices"] == moved["grad_devices"] == ["cuda:0"]
