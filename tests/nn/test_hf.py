import json

import msgspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowmem.nn.hf as hf_module
from lowmem.nn.config import param_shapes, preset
from lowmem.nn.hf import from_hf_name, load_hf, save_hf, to_hf_name
from lowmem.nn.llama import forward, init_params, logits


def tiny(**overrides):
    return msgspec.structs.replace(preset("tiny"), **overrides)


def test_name_map_roundtrip_and_hf_names():
    cfg = tiny()
    names = list(param_shapes(cfg))
    assert [from_hf_name(to_hf_name(n)) for n in names] == names
    assert to_hf_name("layers.1.attn.wq") == "model.layers.1.self_attn.q_proj.weight"
    assert to_hf_name("layers.0.mlp.w1") == "model.layers.0.mlp.gate_proj.weight"
    assert to_hf_name("layers.0.mlp.w2") == "model.layers.0.mlp.down_proj.weight"
    assert to_hf_name("layers.0.mlp_norm") == "model.layers.0.post_attention_layernorm.weight"
    assert to_hf_name("output") == "lm_head.weight"
    with pytest.raises(KeyError):
        to_hf_name("layers.0.attn.wz")
    with pytest.raises(KeyError):
        from_hf_name("model.layers.0.self_attn.q_proj.bias")


def test_hf_checkpoint_names_are_the_mapped_names(hf_checkpoint):
    variant, _, path = hf_checkpoint
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    cfg, _ = load_hf(path)
    expected = {to_hf_name(n) for n in param_shapes(cfg)}
    # a tied transformers checkpoint stores no lm_head, and still loads
    assert stored == expected
    assert ("lm_head.weight" in stored) is (variant != "tied")


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_roundtrip(tmp_path, tied):
    cfg = tiny(tie_embeddings=tied)
    params = init_params(cfg, seed=0)
    out = save_hf(params, cfg, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temp dirs left behind
    stored = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tied
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg and list(params2) == list(params)
    assert all(torch.equal(params2[n], params[n]) for n in params)


def test_save_makes_views_contiguous_and_keeps_dtype(tmp_path):
    cfg = tiny()
    params = init_params(cfg, seed=0, dtype=torch.bfloat16)
    params["layers.0.attn.wq"] = params["layers.0.attn.wq"].T.contiguous().T  # a non-contiguous view
    out = save_hf(params, cfg, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = load_hf(out, dtype=torch.bfloat16)
    assert torch.equal(loaded["layers.0.attn.wq"], params["layers.0.attn.wq"])
    _, as_fp32 = load_hf(out)
    assert as_fp32["norm"].dtype == torch.float32


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    cfg = tiny()
    out = save_hf(init_params(cfg, seed=0), cfg, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save_hf(init_params(cfg, seed=1), cfg, out)
    assert torch.equal(load_hf(out)[1]["norm"], init_params(cfg, seed=0)["norm"])
    save_hf(init_params(cfg, seed=1), cfg, out, overwrite=True)
    assert torch.equal(load_hf(out)[1]["output"], init_params(cfg, seed=1)["output"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    cfg = tiny()
    out = save_hf(init_params(cfg, seed=0), cfg, tmp_path / "ckpt")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(init_params(cfg, seed=1), cfg, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_hf(init_params(cfg, seed=1), cfg, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load_hf(out)[1]["output"], init_params(cfg, seed=0)["output"])


def test_save_checks_params_against_config(tmp_path):
    cfg = tiny()
    params = init_params(cfg, seed=0)
    params["layers.1.mlp.w3"] = params["layers.1.mlp.w3"][:-1]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.w3"):
        save_hf(params, cfg, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("variant_cfg", [{}, {"tie_embeddings": True}, {"rope_theta": 500000.0, "rope_scaling": {
    "kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16}}])
def test_saved_checkpoint_loads_in_transformers(tmp_path, variant_cfg):
    transformers = pytest.importorskip("transformers")
    cfg = msgspec.convert(msgspec.to_builtins(tiny()) | variant_cfg, type(tiny()))
    # weights about 1/sqrt(fan_in) and norms away from 1, so attention is peaked and norms matter
    g = torch.Generator().manual_seed(1)
    params = {n: t / (0.02 * t.shape[1] ** 0.5) if t.ndim == 2 else t + 0.2 * torch.randn(t.shape, generator=g)
              for n, t in init_params(cfg, seed=0).items()}
    out = save_hf(params, cfg, tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings is cfg.tie_embeddings
    tok = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tok).logits
    got = logits(params, forward(params, tok, cfg), cfg)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, hf_model_factory):
    model = hf_model_factory("gqa")
    model.save_pretrained(tmp_path / "single", safe_serialization=True)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    cfg_a, a = load_hf(tmp_path / "single")
    cfg_b, b = load_hf(tmp_path / "sharded")
    assert cfg_a == cfg_b and list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------ bad checkpoints


def write_checkpoint(tmp_path, tensors, cfg):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.fixture
def good_tensors():
    cfg = tiny()
    return cfg, {to_hf_name(n): t for n, t in init_params(cfg, seed=0).items()}


def test_renamed_tensor_is_named(tmp_path, good_tensors):
    cfg, tensors = good_tensors
    tensors["model.layers.1.self_attn.query.weight"] = tensors.pop("model.layers.1.self_attn.q_proj.weight")
    path = write_checkpoint(tmp_path / "ckpt", tensors, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.query\.weight") as e:
        load_hf(path)
    assert "model.safetensors" in str(e.value)


def test_missing_tensor_is_named(tmp_path, good_tensors):
    cfg, tensors = good_tensors
    del tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_hf(write_checkpoint(tmp_path / "ckpt", tensors, cfg))


def test_wrong_shape_names_tensor_and_shapes(tmp_path, good_tensors):
    cfg, tensors = good_tensors
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError) as e:
        load_hf(write_checkpoint(tmp_path / "ckpt", tensors, cfg))
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "(64, 64)" in msg and "(32, 64)" in msg
    assert "model.safetensors" in msg


def test_config_that_disagrees_with_weights(tmp_path, good_tensors):
    cfg, tensors = good_tensors
    path = write_checkpoint(tmp_path / "ckpt", tensors, tiny(n_layers=3))
    with pytest.raises(ValueError, match=r"model\.layers\.2\."):
        load_hf(path)


def test_unsupported_config_names_config_file(tmp_path, good_tensors):
    cfg, tensors = good_tensors
    path = write_checkpoint(tmp_path / "ckpt", tensors, cfg)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config() | {"model_type": "gemma"}))
    with pytest.raises(ValueError, match="config.json") as e:
        load_hf(path)
    assert "'gemma'" in str(e.value)


def test_no_safetensors_is_a_clear_error(tmp_path):
    cfg = tiny()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(tmp_path)


# ------------------------------------------------------------------------------- loading straight to NF4


def test_nf4_while_loading_equals_nf4_after_loading(tmp_path):
    """`load_hf(convert=nf4_converter(cfg))` quantizes each projection as it is read: the same NF4 tensors,
    bit for bit, as quantizing the loaded fp32 params; other tensors are plain and equal (also those read
    into the reused memory of a quantized weight)."""
    from lowmem.nn.config import ModelConfig
    from lowmem.nn.llama import is_nf4
    from lowmem.nn.quant import nf4_converter, quantize_nf4

    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
    out = save_hf(init_params(cfg, seed=0), cfg, tmp_path / "ckpt", max_shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").exists()
    for dtype in (torch.float32, torch.bfloat16):
        _, dense = load_hf(out, dtype=dtype)
        after = quantize_nf4(dense, cfg, scaler_block_size=128)
        _, during = load_hf(out, dtype=dtype, convert=nf4_converter(cfg, scaler_block_size=128))
        assert list(during) == list(after)
        for name, t in after.items():
            assert is_nf4(during[name]) is is_nf4(t), name
            if is_nf4(t):
                for attr in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
                    assert torch.equal(getattr(during[name], attr), getattr(t, attr)), (name, attr)
            else:
                assert torch.equal(during[name], t) and during[name].dtype == dtype, name
        storages = {during[n].untyped_storage().data_ptr() for n in during if not is_nf4(during[n])}
        assert len(storages) == sum(not is_nf4(t) for t in during.values())  # no two share memory


def test_cast_while_reading_in_small_pieces(tmp_path, monkeypatch):
    """A cast goes through a bounded buffer, piece by piece (here 40 bytes: 10 fp32 or 20 bf16 values at a
    time, pieces ending mid-row); the result equals casting the whole tensor."""
    cfg = tiny()
    params = init_params(cfg, seed=0)
    out = save_hf(params, cfg, tmp_path / "ckpt")
    monkeypatch.setattr(hf_module, "_CAST_BUFFER_BYTES", 40)
    _, as_bf16 = load_hf(out, dtype=torch.bfloat16)
    assert all(torch.equal(as_bf16[n], params[n].to(torch.bfloat16)) for n in params)
    out16 = save_hf(as_bf16, cfg, tmp_path / "ckpt16")
    _, back = load_hf(out16, dtype=torch.float32)
    assert all(torch.equal(back[n], as_bf16[n].float()) for n in params)


# ------------------------------------------------------------------------------------- damaged weight files


@pytest.mark.parametrize("damage", ["truncated", "header bytes", "empty"])
def test_a_damaged_weight_file_is_named_by_load_and_by_plan(tmp_path, damage):
    """A truncated model.safetensors or flipped header bytes: one message naming the file and what is wrong,
    from load_hf and from `lowmem plan` (which reads the headers before a run), never a SafetensorError."""
    import subprocess
    import sys

    from lowmem.spec import decode_spec, encode_spec

    cfg = preset("tiny")
    model_dir = save_hf(init_params(cfg, seed=0), cfg, tmp_path / "model")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "header bytes":
        weights.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    else:
        weights.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{weights}: damaged safetensors file: .*Download or copy it again"):
        load_hf(model_dir)
    spec = decode_spec('[model]\npath = "PATH"\n[data]\nsource = "builtin:kjv"\n[train]\nsteps = 1\nseq_len = 64\n'
                       .replace("PATH", str(model_dir)), "toml")
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(spec))
    done = subprocess.run([sys.executable, "-m", "lowmem.cli", "plan", str(spec_file)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert f"{weights}: damaged safetensors file" in done.stderr


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_saved_model_directory_has_ordinary_permissions(tmp_path, umask, dir_mode, file_mode):
    # not mkdtemp's 0700 nor safetensors' 0600: what mkdir and open would give under the user's umask
    import os
    import stat

    cfg = preset("tiny")
    previous = os.umask(umask)
    try:
        out = save_hf(init_params(cfg, seed=0), cfg, tmp_path / "model")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {file_mode}, modes
