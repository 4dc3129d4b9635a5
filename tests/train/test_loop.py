"""execute(): golden losses, and the numbers strategies must not change."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem.plan import plan, with_strategies
from lowmem.spec.structs import ScheduleSpec
from lowmem.train import execute
from lowmem.train.optim import lr_at


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(spec, out):
    execute(plan(spec, "cpu"), out, progress=False)
    return _losses(out)


# Golden losses of the tiny spec (tests/conftest.py), fp32 on CPU, seed 0: 4 steps of 4 x 128 tokens.
# Re-recorded when best-fit packing landed; a change means the model, data, init or optimizer changed.
GOLDEN = [6.9459, 6.9027, 6.8067, 6.7595]


def test_golden_losses(tiny_spec, tmp_path):
    losses = _run(tiny_spec(), tmp_path)
    assert losses == pytest.approx(GOLDEN, abs=2e-3)


def test_same_spec_same_losses_bitwise(tiny_spec, tmp_path):
    assert _run(tiny_spec("train.steps=3"), tmp_path / "a") == _run(tiny_spec("train.steps=3"), tmp_path / "b")


def test_loss_falls_clearly(tiny_spec, tmp_path):
    losses = _run(tiny_spec("train.steps=30", "train.schedule.warmup_steps=3"), tmp_path)
    assert losses[-1] < losses[0] - 1.0, losses


def test_gradient_accumulation_equals_the_larger_batch(tiny_spec, tmp_path):
    # 1 x 4 rows and 2 x 2 rows see the same rows in the same order; the token-count normalization makes the
    # gradient identical up to float summation order. SGD, so that the weights differ only as the gradients do:
    # AdamW's normalized update turns summation-order noise in a near-zero gradient element into a step of up to
    # lr (seen on an AVX512 CPU: 4 of 65,536 elements 4e-6 apart after 2 steps).
    sgd = ("optimizer.kind=sgd", "optimizer.lr=0.5")
    one = tiny_spec("train.steps=2", "train.micro_batch=4", "train.grad_accum=1", *sgd)
    two = tiny_spec("train.steps=2", "train.micro_batch=2", "train.grad_accum=2", *sgd)
    la, lb = _run(one, tmp_path / "a"), _run(two, tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-5)
    wa, wb = load_file(tmp_path / "a/model/model.safetensors"), load_file(tmp_path / "b/model/model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_checkpointing_changes_no_numbers(tiny_spec, tmp_path):
    off = _run(tiny_spec("train.steps=3"), tmp_path / "off")
    on = _run(tiny_spec("train.steps=3", "memory.strategies.activation_checkpointing=on"), tmp_path / "on")
    assert on == pytest.approx(off, rel=1e-6, abs=1e-6)
    wa = load_file(tmp_path / "off/model/model.safetensors")
    wb = load_file(tmp_path / "on/model/model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-7)


def test_run_directory_contents(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=2", "data.eval_rows=8", "train.eval_every=1")
    result = execute(plan(spec, "cpu"), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= r.keys() for r in records)
    assert result.eval_loss == records[-1]["eval_loss"]
    for name in ("plan.json", "memory.json", "model/config.json", "model/model.safetensors", "model/tokenizer.model"):
        assert (tmp_path / name).is_file(), name


def test_saved_model_loads_in_transformers_and_matches(tiny_spec, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lowmem.nn import forward, load_hf, logits

    execute(plan(tiny_spec("train.steps=1"), "cpu"), tmp_path, progress=False)
    cfg, params = load_hf(tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = logits(params, forward(params, tokens, cfg), cfg)
        theirs = model(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lr_schedule_warmup_and_cosine_floor():
    sched = ScheduleSpec(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, 1.0, sched) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(5, 100, 1.0, ScheduleSpec(kind="constant", warmup_steps=0)) == 1.0
    assert lr_at(99, 100, 2.0, ScheduleSpec(kind="linear", warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(0.0)


@pytest.mark.parametrize("loss", ["chunked", "fused"])
def test_loss_strategies_change_no_numbers(tiny_spec, tmp_path, loss):
    base = ["train.steps=3", "memory.strategies.chunked_cross_entropy=off", "memory.strategies.fused_cross_entropy=off"]
    ref = _run(tiny_spec(*base), tmp_path / "standard")
    forced = [o for o in base if loss not in o] + [f"memory.strategies.{loss}_cross_entropy=on"]
    got = _run(tiny_spec(*forced), tmp_path / loss)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    wa = load_file(tmp_path / "standard/model/model.safetensors")
    wb = load_file(tmp_path / f"{loss}/model/model.safetensors")
    # Adam divides by sqrt(v): gradients that differ in the last bits move a near-zero-gradient weight by ~1e-6
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_run_trains_only_adapters_and_exports_peft(tiny_spec, tmp_path, kind):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lowmem.nn import forward, load_hf, logits
    from lowmem.nn.peft_io import load_peft

    spec = tiny_spec("train.steps=20", "optimizer.lr=1e-2", f"method.kind={kind}", "method.rank=4",
                     "method.targets=[wq,wv,w1,w2]")
    result = execute(plan(spec, "cpu"), tmp_path, progress=False)
    assert result.final_loss < result.first_loss - 0.05
    cfg, base = load_hf(tmp_path / "base")
    # the saved base is the untouched random init: adapters carried all the training
    from lowmem.nn import init_params

    for name, tensor in init_params(cfg, seed=0).items():
        torch.testing.assert_close(base[name], tensor, rtol=0, atol=0)
    settings, adapted = load_peft(tmp_path / "adapter", base, cfg)
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter")
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = logits(adapted, forward(adapted, tokens, cfg, adapters=settings), cfg)
        theirs = model(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_adapter_run_resumes_exactly(tiny_spec, tmp_path):
    import shutil

    spec = tiny_spec("train.steps=4", "method.kind=lora", "method.dropout=0.1", "output.save_every=2",
                     "output.keep=3")
    execute(plan(spec, "cpu"), tmp_path / "ref", progress=False)
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False)
    shutil.rmtree(tmp_path / "part/adapter")
    # checkpoints hold only the trainable tensors
    from safetensors.torch import load_file as load

    names = load(tmp_path / "part/checkpoints/step-00000002/model.safetensors").keys()
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    result = execute(plan(spec, "cpu"), tmp_path / "part", progress=False, resume=True)
    assert result.resumed_from_step == 2
    assert _losses(tmp_path / "part") == _losses(tmp_path / "ref")


def test_optimizer_in_backward_changes_no_numbers(tiny_spec, tmp_path):
    # SGD: the update is linear in the gradient, so float-summation differences stay at float precision (Adam's
    # division by sqrt(v) amplifies them for near-zero gradients; the AdamW path is covered by the losses below)
    base = ("train.steps=3", "train.clip_grad_norm=0", "optimizer.kind=sgd", "optimizer.lr=0.5")
    off = _run(tiny_spec(*base, "memory.strategies.optimizer_in_backward=off"), tmp_path / "off")
    on = _run(tiny_spec(*base, "memory.strategies.optimizer_in_backward=on"), tmp_path / "on")
    assert on == pytest.approx(off, rel=1e-6, abs=1e-6)
    wa, wb = load_file(tmp_path / "off/model/model.safetensors"), load_file(tmp_path / "on/model/model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)
    adamw = ("train.steps=3", "train.clip_grad_norm=0")
    assert _run(tiny_spec(*adamw, "memory.strategies.optimizer_in_backward=on"), tmp_path / "adam-on") == \
        pytest.approx(_run(tiny_spec(*adamw, "memory.strategies.optimizer_in_backward=off"), tmp_path / "adam-off"),
                      rel=1e-6)
    grad_norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "on/metrics.jsonl").read_text().splitlines()]
    ref_norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "off/metrics.jsonl").read_text().splitlines()]
    assert grad_norms == pytest.approx(ref_norms, rel=1e-4)


def test_optimizer_in_backward_resumes_exactly(tiny_spec, tmp_path):
    import shutil

    spec = tiny_spec("train.steps=4", "train.clip_grad_norm=0", "memory.strategies.optimizer_in_backward=on",
                     "output.save_every=2", "output.keep=3")
    execute(plan(spec, "cpu"), tmp_path / "ref", progress=False)
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False)
    shutil.rmtree(tmp_path / "part/model")
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False, resume=True)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "ref")


def test_qlora_run_trains_adapters_on_nf4_and_exports_a_loadable_base(tiny_spec, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lowmem.nn import forward, load_hf, logits
    from lowmem.nn.peft_io import load_peft

    spec = tiny_spec("train.steps=15", "optimizer.lr=1e-2", "method.kind=qlora", "method.rank=4",
                     "model.preset=quickstart-5m", "train.seq_len=64")
    result = execute(plan(spec, "cpu"), tmp_path, progress=False)
    assert result.final_loss < result.first_loss - 0.05
    # the exported base is the dequantized NF4 base the adapters were trained on: base + adapter in peft
    # reproduces lowmem's logits
    cfg, base = load_hf(tmp_path / "base")
    settings, adapted = load_peft(tmp_path / "adapter", base, cfg)
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter")
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(logits(adapted, forward(adapted, tokens, cfg, adapters=settings), cfg),
                                   model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_partial_checkpointing_changes_no_numbers_and_sits_between_off_and_full(tiny_spec, tmp_path):
    shape = ("model.preset=quickstart-5m", "train.seq_len=128", "train.steps=2", "output.save_final=false",
             "memory.strategies.chunked_cross_entropy=off", "memory.strategies.fused_cross_entropy=off")
    peaks, planned, losses = {}, {}, {}
    for value in ("off", "every-2", "first-3", "first-5", "full"):
        spec = tiny_spec(*shape, "memory.strategies.activation_checkpointing=auto")
        p = plan(spec, "cpu")
        # partial checkpointing cannot be forced from the spec (on means full): put it in the plan as the planner
        # would, re-estimated
        p = with_strategies(p, activation_checkpointing=value)
        execute(p, tmp_path / value, progress=False)
        report = json.loads((tmp_path / value / "memory.json").read_text())
        peaks[value], planned[value] = report["measured_peak_bytes"], report["planned_peak_bytes"]
        losses[value] = _losses(tmp_path / value)
    for value in ("every-2", "first-3", "first-5", "full"):
        assert losses[value] == pytest.approx(losses["off"], rel=1e-6), value
        assert planned[value] == pytest.approx(peaks[value], rel=0.05), (value, planned[value], peaks[value])
    assert peaks["full"] <= peaks["first-5"] < peaks["first-3"] < peaks["off"], peaks
    assert peaks["first-3"] <= peaks["every-2"], peaks  # the same count of blocks recomputed
