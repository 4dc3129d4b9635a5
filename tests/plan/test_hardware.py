"""Hardware profiles from a file (`--hardware my-box.toml`) and a host RAM the user sets (`--host-ram`)."""

import pytest

from lowmem.plan import plan
from lowmem.plan.hardware import PROFILES, load_hardware_file, resolve_hardware

BOX = '''name = "my-box"
memory = "24GiB"
host_ram = "32GiB"
bf16_tflops = 165
fp32_tflops = 82.6
memory_bandwidth_gbps = 1008
pcie_gbps = 32
compute_capability = "8.9"
'''


def test_a_profile_file_gives_the_profile_it_describes(tmp_path, tiny_spec):
    path = tmp_path / "my-box.toml"
    path.write_text(BOX)
    hw = resolve_hardware(str(path))
    assert (hw.name, hw.device, hw.memory_bytes, hw.host_ram_bytes) == ("my-box", "cuda", 24 * 1024**3, 32 * 1024**3)
    assert hw.peak_flops_bf16 == 165e12 and hw.memory_bytes_per_s == 1008e9 and hw.pcie_bytes_per_s == 32e9
    # it plans like the named profile with the same figures
    named = PROFILES["rtx4090-24gb"]
    assert plan(tiny_spec(), hw).strategies.precision == plan(tiny_spec(), named).strategies.precision


@pytest.mark.parametrize("edit,parts", [
    (("bf16_tflops = 165", 'bf16_tflops = "fast"'), ("bf16_tflops = 'fast'", "Expected `float`", "e.g. 165")),
    (('memory = "24GiB"', 'memory = "24 gigs"'), ("memory = '24 gigs'", "not a size", '"24GiB"')),
    (('host_ram = "32GiB"\n', ""), ("host_ram is missing", "add host_ram =")),
    (("pcie_gbps = 32", "mem_bw = 3"), ("mem_bw = 3", "no such field", "memory_bandwidth_gbps")),
    (('device = "cuda"', 'device = "tpu"'), ()),
])
def test_a_bad_profile_file_is_one_line_naming_file_field_value_and_fix(tmp_path, edit, parts):
    path = tmp_path / "box.toml"
    text = BOX.replace(*edit) if edit[0] in BOX else BOX + edit[1] + "\n"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_hardware_file(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for part in parts or ("device = 'tpu'", '"cuda" or "cpu"'):
        assert part in message


def test_a_missing_profile_file_says_where_it_looked(tmp_path):
    with pytest.raises(ValueError, match="no such profile file"):
        resolve_hardware(str(tmp_path / "nope.toml"))


def test_host_ram_replaces_the_profiles_and_on_a_cpu_its_memory(tiny_spec):
    gpu = resolve_hardware("rtx4090-24gb", "16GiB")
    assert gpu.host_ram_bytes == 16 * 1024**3 and gpu.memory_bytes == PROFILES["rtx4090-24gb"].memory_bytes
    cpu = resolve_hardware("cpu", "2GiB")
    assert cpu.host_ram_bytes == cpu.memory_bytes == 2 * 1024**3
    with pytest.raises(ValueError, match="--host-ram 'lots'"):
        resolve_hardware("cpu", "lots")
