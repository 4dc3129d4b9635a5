"""Data-parallel training (FSDP2, gloo): two ranks under torchrun equal one process with twice the micro-batch."""

import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tests.conftest import TINY_SPEC

from lowmem.plan import plan
from lowmem.spec import decode_spec, encode_spec
from lowmem.train import execute
from lowmem.train.loop import check_distributable

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
PER_RANK_BATCH = 2
# Same rows, same fp32 math; only the order of float sums differs (each rank's token sum, the gloo reductions).
REL_TOL = 1e-5
# Final weights, per optimizer. SGD passes rounding through linearly (measured: 1e-8 apart). AdamW's first
# updates are lr * g / (|g| + eps): for an element whose gradient is within rounding of zero, a last-bit change
# in g moves the update by up to lr (3e-3), so a handful of elements can differ by far more than the rest
# (measured: 3.7e-5 on 1 and 1.02e-5 on 1 of 222k elements, every other one within 1e-5).
WEIGHT_ATOL = {"sgd": 1e-5, "adamw": 1e-4}
# The SGD pair also runs activation checkpointing and the chunked loss (both sides): recomputing a block in
# backward must go through FSDP's gathered weights too.
OPTIMIZERS = {
    "adamw": ["optimizer.kind=adamw"],
    "sgd": ["optimizer.kind=sgd", "optimizer.lr=0.5", "memory.strategies.activation_checkpointing=on",
            "memory.strategies.chunked_cross_entropy=on"],
}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(data_cache, micro_batch: int, optimizer: str):
    return decode_spec(TINY_SPEC, "toml", overrides=[
        f"data.cache_dir={data_cache}", "data.eval_rows=8", "train.steps=3", f"train.micro_batch={micro_batch}",
        "train.eval_every=3", "train.eval_batches=1", *OPTIMIZERS[optimizer],
    ])


@pytest.fixture(scope="module", params=list(OPTIMIZERS))
def runs(request, data_cache, tmp_path_factory):
    """(optimizer, torchrun run dir: 2 ranks x micro_batch 2, single-process run dir: micro_batch 4)."""
    optimizer = request.param
    root = tmp_path_factory.mktemp(f"distributed-{optimizer}")
    single = root / "single"
    execute(plan(_spec(data_cache, PER_RANK_BATCH * WORLD, optimizer), "cpu"), single, progress=False)
    spec_file = root / "spec.toml"
    spec_file.write_bytes(encode_spec(_spec(data_cache, PER_RANK_BATCH, optimizer), "toml"))
    sharded = root / "sharded"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
         "--master_port", str(_free_port()), "-m", "lowmem.cli", "execute", str(spec_file),
         "--out", str(sharded), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return optimizer, sharded, single


def test_losses_and_grad_norms_equal_the_single_process_batch(runs):
    sharded, single = (_metrics(d) for d in runs[1:])
    assert [r["step"] for r in sharded] == [1, 2, 3]
    for key in ("loss", "grad_norm"):  # grad_norm catches a wrong gradient scale that AdamW would hide
        assert [r[key] for r in sharded] == pytest.approx([r[key] for r in single], rel=REL_TOL), key
    assert sharded[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], rel=REL_TOL)
    assert [r["tokens"] for r in sharded] == [r["tokens"] for r in single]  # tokens count every rank's


def test_final_weights_equal_the_single_process_run(runs):
    optimizer = runs[0]
    sharded, single = (load_file(d / "model" / "model.safetensors") for d in runs[1:])
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=WEIGHT_ATOL[optimizer], msg=name)


def test_only_rank_0_writes_the_run_directory(runs):
    sharded = runs[1]
    assert sorted(p.name for p in sharded.iterdir()) == ["memory.json", "metrics.jsonl", "model", "plan.json"]
    assert len(_metrics(sharded)) == 3  # one record per step, not one per rank


@pytest.mark.parametrize("override, message", [
    ("method.kind=lora", "method.kind = 'lora'"),
    ("output.save_every=1", "output.save_every = 1"),
    ("optimizer.kind=adafactor", "optimizer.kind = 'adafactor'"),
])
def test_refuses_what_it_cannot_shard(tiny_spec, override, message):
    p = plan(tiny_spec(override), "cpu")
    check_distributable(p, world=1, resume=False)  # a single process runs it
    with pytest.raises(ValueError, match=message):
        check_distributable(p, world=WORLD, resume=False)
