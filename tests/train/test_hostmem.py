"""lowmem's CPU caching allocator (lowmem.hostmem): blocks are reused by size class, a limit unmaps cached ones,
and a run on it holds less RSS than on glibc with the same losses, bit for bit."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.conftest import TINY_SPEC

from lowmem import hostmem

MiB = 1 << 20

pytestmark = pytest.mark.skipif(not hostmem.available(), reason="needs Linux and a C++ compiler")


@pytest.fixture
def allocator():
    was = hostmem.installed()
    hostmem.install()
    hostmem.empty_cache()
    yield hostmem
    hostmem.set_limit(None)
    if not was:
        hostmem.uninstall()


def size_class(n: int) -> int:
    """hostalloc.cpp's rounding: 8 classes per power of two, in whole pages."""
    step = max((1 << (n.bit_length() - 1)) // hostmem.SIZE_CLASSES_PER_OCTAVE, 4096)
    return -(-n // step) * step


def test_a_freed_block_serves_the_next_tensor_of_its_size_class(allocator):
    before = allocator.stats()
    a = torch.empty(3 * MiB + 5, dtype=torch.uint8)
    after_first = allocator.stats()
    assert after_first.maps == before.maps + 1
    assert after_first.live_bytes - before.live_bytes == size_class(3 * MiB + 5) == 3 * MiB + 256 * 1024  # 2 MiB / 8 steps
    address = a.data_ptr()
    del a
    b = torch.empty(3 * MiB + 100, dtype=torch.uint8)  # same class: the same block, no new mapping
    assert b.data_ptr() == address
    s = allocator.stats()
    assert (s.maps, s.hits) == (after_first.maps, after_first.hits + 1)
    small = torch.empty(1000)  # under 1 MiB: torch's own allocator
    assert allocator.stats().live_bytes == s.live_bytes
    b.fill_(7)
    assert int(b[-1]) == 7 and small.numel() == 1000


def test_the_limit_unmaps_cached_blocks_before_mapping_more(allocator):
    live = allocator.stats().live_bytes  # whatever else is alive in this process
    blocks = [torch.empty(4 * MiB, dtype=torch.uint8) for _ in range(4)]
    del blocks
    assert allocator.stats().cached_bytes == 16 * MiB
    allocator.set_limit(live + 10 * MiB)  # cached blocks go until live + cached fit
    s = allocator.stats()
    assert s.live_bytes == live and s.cached_bytes == 8 * MiB
    big = torch.empty(6 * MiB, dtype=torch.uint8)  # another class: the cache makes room for it first
    s = allocator.stats()
    assert s.live_bytes == live + 6 * MiB and s.cached_bytes == 4 * MiB and s.unmaps >= 3
    del big
    allocator.empty_cache()
    assert allocator.stats().cached_bytes == 0


def test_torch_profiler_sees_its_allocations_and_frees(allocator, tmp_path):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        big = torch.empty(2 * MiB + 8, dtype=torch.uint8)  # from a cached block
        small = torch.empty(100, dtype=torch.uint8)  # from torch's allocator
        del big, small
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    sizes = [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]"]
    assert {2 * MiB + 8, -(2 * MiB + 8), 100, -100} <= set(sizes), sizes


def test_tensors_outlive_an_uninstall_and_torchs_own_stay_valid():
    was = hostmem.installed()
    hostmem.uninstall()
    before = torch.arange(2 * MiB, dtype=torch.float32)  # glibc's
    hostmem.install()
    ours = torch.arange(2 * MiB, dtype=torch.float32)
    del before  # freed through torch's deleter, not ours
    hostmem.uninstall()
    assert float(ours[-1]) == 2 * MiB - 1
    del ours  # freed through ours after the uninstall
    after = torch.ones(2 * MiB)
    assert float(after.sum()) == 2 * MiB
    if was:
        hostmem.install()


# A child process: plan, execute (memory.json's process block holds the RSS the run added, libraries loaded).
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lowmem.plan import plan
    from lowmem.spec import decode_spec
    from lowmem.train import execute

    p = plan(decode_spec(sys.argv[1], "toml", overrides=json.loads(sys.argv[2])))
    execute(p, sys.argv[3], progress=False)
    print(json.dumps({"planned": p.memory.device_bytes, "allocator": p.strategies.host_allocator}))
""")

SPEC = TINY_SPEC  # made the size where glibc's heap shows: quickstart-5m, LoRA, 8 x 256 tokens
SIZE = ["model.preset=quickstart-5m", "data.tokenizer.vocab_size=4096", "method.kind=lora", "optimizer.lr=1e-3",
        "train.steps=6", "train.micro_batch=8", "train.seq_len=256", "memory.strategies.activation_checkpointing=off",
        "output.save_final=false"]


@pytest.mark.slow
def test_a_run_on_the_caching_allocator_holds_less_rss_for_the_same_losses(tmp_path, data_cache):
    from lowmem.plan import plan
    from lowmem.spec import decode_spec
    from lowmem.train.inputs import prepare_data

    base = [f"data.cache_dir={data_cache}", *SIZE]
    prepare_data(decode_spec(SPEC, "toml", overrides=base))  # tokenizer and packed rows cached before the runs
    runs = {}
    for toggle in ("on", "off"):
        out = tmp_path / toggle
        overrides = [*base, f"memory.strategies.host_caching_allocator={toggle}"]
        done = subprocess.run([sys.executable, "-c", CHILD, SPEC, json.dumps(overrides), str(out)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[toggle] = json.loads(done.stdout.strip().splitlines()[-1])
        process = json.loads((out / "memory.json").read_text())["process"]
        runs[toggle].update(process=process, rss_added=process["rss_added_bytes"])
        runs[toggle]["losses"] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                                  if '"loss"' in line]
    on, off = runs["on"], runs["off"]
    assert (on["allocator"], off["allocator"]) == ("caching", "system")
    assert on["losses"] == off["losses"] and len(on["losses"]) == 6  # the same kernels: bit-identical
    # measured: 319 vs 476 MiB (1 thread, torch 2.13): glibc's heap keeps about twice the step's tensors
    assert on["rss_added"] < 0.8 * off["rss_added"], runs
    # each plan bounds what its run added to RSS (memory.json has both)
    for run in (on, off):
        assert run["rss_added"] <= run["planned"] == run["process"]["planned_rss_bytes"], runs
        assert run["process"]["host_allocator"] == run["allocator"]
    assert 0 < on["process"]["allocator_peak_bytes"] < on["rss_added"] and "allocator_peak_bytes" not in off["process"]
    assert plan(decode_spec(SPEC, "toml", overrides=base)).memory.device_bytes == on["planned"]
