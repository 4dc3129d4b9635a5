"""The executor's code for a CUDA plan, run on fake CUDA: every strategy the CUDA planner can choose.

One child process (lowmem.fakecuda) runs, for each combination, the real weight creation (`initial_params`:
straight onto `cuda`, QLoRA quantized tensor by tensor), `build_training`, two `train_step`s fed by the real
loader through `DeviceBatches`, `evaluate`, the checkpoint's state collection, and `generate`. A second child
shows the check can fail: a batch never copied, or one weight left on the host, raises
FakeTensorDeviceMismatchError where it is used. What fake CUDA cannot show (kernel speed, the allocator's
rounding, real NCCL) is measured by benchmarks/gpu_check.py on a GPU.
"""

import pytest

from lowmem import fakecuda

COMBOS = [
    {"name": "full bf16 (planned)"},
    {"name": "full mixed-bf16", "overrides": ["memory.precision=mixed-bf16"]},
    {"name": "full fp16 (loss scaling)", "overrides": ["memory.precision=fp16"]},
    {"name": "full fp32 (sdpa-efficient)", "overrides": ["memory.precision=fp32"]},
    {"name": "checkpoint every-2", "strategies": {"activation_checkpointing": "every-2"}},
    {"name": "checkpoint selective", "strategies": {"activation_checkpointing": "selective"}},
    {"name": "checkpoint full + chunked CE", "strategies": {"activation_checkpointing": "full",
                                                           "cross_entropy": "chunked"}},
    {"name": "fused CE", "strategies": {"cross_entropy": "fused"}},
    {"name": "optimizer in backward", "overrides": ["train.clip_grad_norm=0"],
     "strategies": {"optimizer_in_backward": True}},
    {"name": "bitsandbytes 8-bit AdamW", "strategies": {"optimizer_state": "8bit"}},
    {"name": "torchao AdamW8bit", "overrides": ["optimizer.kind=adamw8bit", "optimizer.backend=torchao"]},
    {"name": "torchao AdamW4bit", "overrides": ["optimizer.kind=adamw4bit"]},
    {"name": "stochastic rounding", "overrides": ["memory.precision=bf16"],
     "strategies": {"bf16_stochastic_rounding": True}},
    {"name": "micro-batch split 2 + accumulation 2", "overrides": ["train.grad_accum=2"],
     "strategies": {"micro_batch_split": 2}},
    {"name": "activation offloading", "strategies": {"activation_offloading": True, "offload_min_bytes": 1,
                                                     "offload_max_host_bytes": 1 << 30,
                                                     "activation_checkpointing": "full"}},
    {"name": "sgd", "overrides": ["optimizer.kind=sgd"]},
    {"name": "lora", "overrides": ["method.kind=lora"]},
    {"name": "dora", "overrides": ["method.kind=dora"]},
    {"name": "lora mixed-bf16", "overrides": ["method.kind=lora", "memory.precision=mixed-bf16"]},
    {"name": "qlora", "overrides": ["method.kind=qlora"]},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("fake-cuda-cache"))
    return {r["name"]: r for r in fakecuda.run("tests/train/cuda_run_cases.py:run_combinations", cache, COMBOS)}


@pytest.mark.parametrize("name", [c["name"] for c in COMBOS])
def test_every_cuda_strategy_trains_evaluates_and_generates_on_the_device(results, name):
    r = results[name]
    assert r["params"] == ["cuda:0"], "every weight is created or loaded on the device, none on the host"
    assert r["trainable"] == ["cuda:0"]
    assert r["optimizer_state"] in (["cuda:0"], []), "optimizer states live beside their parameters"
    assert r["generated"] == ["cuda:0"] and r["loss_is_float"], "prefill, the KV cache and decoding stay on cuda"


def test_cuda_plans_name_their_attention_kernel(results):
    assert results["full bf16 (planned)"]["attention_kernel"] == "varlen"
    assert results["full fp32 (sdpa-efficient)"]["attention_kernel"] == "sdpa-efficient"


def test_a_host_side_batch_or_weight_fails_on_fake_cuda(tmp_path):
    out = fakecuda.run("tests/train/cuda_run_cases.py:host_side_failures", str(tmp_path / "cache"))
    assert out["host_batch"].startswith(("mismatch", "refused")) and "cpu" in out["host_batch"], out
    assert out["host_param"].startswith("mismatch"), out


def test_plan_trace_of_a_cuda_plan_runs_on_fake_cuda_and_agrees_with_the_analytic_plan(tmp_path):
    import re
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lowmem.cli", "plan", "examples/quickstart.toml", "--hardware",
                           "h100-80gb", "--trace", f"--set=data.cache_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "varlen" in done.stdout  # the kernel the trace routes attention to is the plan's
    off = re.search(r"analytic is ([+-][0-9.]+)% off traced", done.stdout)
    assert off and abs(float(off.group(1))) <= 5.0, done.stdout[-1500:]
