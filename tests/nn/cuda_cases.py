"""Checks that run on fake CUDA, in a child process (`lowmem.fakecuda.run("tests/nn/cuda_cases.py:NAME", ...)`).

Each function imports torch itself (the fake-CUDA shim must load first), runs many checks in one process (a
child costs about 5 s) and returns JSON-able results that tests/nn/test_cuda_attention.py asserts on.
"""

from __future__ import annotations

KERNELS = ("sdpa", "sdpa-efficient", "varlen")


def _config(T: int):
    """Tiny GQA Llama whose even layers have a sliding window, with every dimension below T."""
    from lowmem.nn.config import ModelConfig

    return ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=112,
                       max_seq_len=T, sliding_window=T // 4, sliding_layers="even")


def _packed_batch(T: int) -> dict:
    """Two rows: three documents then padding, and one document over the whole row (CPU tensors)."""
    import numpy as np

    from lowmem.data.loader import make_batch

    lengths = [T // 2, T // 4, T // 8]
    row0 = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(T - sum(lengths))])
    doc_ids = np.stack([row0, np.full(T, 4)]).astype(np.int64)
    tokens = np.random.default_rng(0).integers(0, 96, size=(2, T))
    return make_batch(tokens, doc_ids)


def _square_tensors(T: int, n_starts: int):
    """A dispatch mode that records every op and each output with two or more dims of size >= T.

    A fake tensor has no values, so it also answers the one data-dependent op of varlen's `cu_seq_lens`, the
    `nonzero` of the flattened document starts, with `n_starts` rows (counted on the real batch).
    """
    import torch
    import torch.nn.attention.varlen  # noqa: F401  (registers the torch_attn ops named below)
    from torch.utils._python_dispatch import TorchDispatchMode

    class SquareTensors(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.square: list[str] = []  # "op shape" of each T x T-sized output
            self.ops: set[str] = set()
            self.varlen_calls: list[dict] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.nonzero.default:
                assert args[0].dtype == torch.bool and args[0].dim() == 1, "only cu_seq_lens's nonzero"
                self.ops.add(str(func))
                return torch.empty((n_starts, 1), dtype=torch.int64, device=args[0].device)
            out = func(*args, **(kwargs or {}))
            self.ops.add(str(func))
            if func is torch.ops.torch_attn._varlen_attn.default:
                q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, gqa = args[:11]
                self.varlen_calls.append({"cu_seq_len": cu_q.shape[0], "max_q": max_q, "max_k": max_k,
                                          "is_causal": is_causal, "window": list(window), "gqa": gqa,
                                          "q": list(q.shape), "k": list(k.shape)})
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and sum(d >= T for d in t.shape) >= 2:
                    self.square.append(f"{func} {tuple(t.shape)}")
            return out

    return SquareTensors()


def kernels_on_fake_cuda(T: int) -> dict:
    """Forward + backward of a tiny Llama on fake CUDA with each attention kernel, packed and not.

    Plain bf16 for every kernel ("kernel/packed", "kernel/plain"), then through `block_runner` with fp32
    master weights cast to bf16 in the blocks and "full" or "selective" checkpointing
    ("kernel/packed/mixed-bf16-full", ...). Returns per run: whether every parameter got a gradient on cuda,
    the T x T-sized outputs seen, the attention ops seen, the arguments of each varlen call in forward, and
    how many varlen calls ran in all (a recompute runs them again, unless selective checkpointing saved them).
    """
    runs = [(kernel, packed, None) for kernel in KERNELS for packed in (True, False)]
    runs += [(kernel, True, ac) for kernel in ("varlen", "sdpa-efficient") for ac in ("full", "selective")]
    return _run_kernels(T, runs)


def _run_kernels(T: int, runs: list) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.nn.llama import doc_starts, forward, init_params, output_weight
    from lowmem.nn.loss import cross_entropy_sum
    from lowmem.plan.structs import Strategies
    from lowmem.train.strategies import block_runner

    cfg = _config(T)
    batch = _packed_batch(T)
    n_starts = int(doc_starts(batch["doc_ids"]).sum())
    results: dict[str, object] = {"n_starts": n_starts}
    for kernel, packed, checkpointing in runs:
        name = f"{kernel}/{'packed' if packed else 'plain'}"
        run_block = None
        dtype = torch.bfloat16
        if checkpointing is not None:
            name += f"/mixed-bf16-{checkpointing}"
            dtype = torch.float32
            strategies = Strategies(precision="mixed-bf16", activation_checkpointing=checkpointing,
                                    cross_entropy="standard")
        with FakeTensorMode() as mode:
            params = init_params(cfg, seed=0, dtype=dtype, device="cuda")
            for p in params.values():
                p.requires_grad_(True)
            if checkpointing is not None:
                run_block = block_runner(strategies, params)
            b = {k: mode.from_tensor(v).to("cuda") for k, v in batch.items()}
            seen = _square_tensors(T, n_starts)
            with seen:
                h = forward(params, b["tokens"], cfg, positions=b["positions"],
                            doc_ids=b["doc_ids"] if packed else None, run_block=run_block,
                            attention_kernel=kernel)
                forward_calls = list(seen.varlen_calls)
                loss, _ = cross_entropy_sum(h, output_weight(params, cfg), b["labels"])
                loss.backward()
            grads_on_cuda = all(p.grad is not None and p.grad.device.type == "cuda"
                                and p.grad.shape == p.shape and p.grad.dtype == dtype for p in params.values())
        results[name] = {
            "grads_on_cuda": grads_on_cuda,
            "hidden": [list(h.shape), str(h.dtype), str(h.device)],
            "square": seen.square,
            "attention_ops": sorted(op for op in seen.ops if "attention" in op or "varlen" in op),
            "varlen_calls": forward_calls,
            "varlen_calls_in_all": len(seen.varlen_calls),
        }
    return results


def _saved_storages(fn) -> dict[int, int]:
    """{storage id: bytes} of every distinct storage autograd saves while `fn()` runs."""
    import torch

    storages: dict[int, object] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s._cdata] = s  # kept alive, so no id is reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {key: s.nbytes() for key, s in storages.items()}


def saved_bytes(shapes: list[list[int]]) -> list[dict]:
    """Bytes each kernel's attention saves for backward on fake CUDA (bf16), measured and as predicted.

    shapes: [B, T, n_heads, n_kv_heads, head_dim] per case. "math" is unrouted SDPA (`attend`, what "sdpa"
    runs on fake CUDA); varlen's measurement leaves out its `cu_seq`, which forward shares between layers
    (reported apart). "efficient-2-layers-masked" runs two layers on one shared additive mask, to check that
    the mask is saved once, not once per layer.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    results = []
    for shape in shapes:
        with FakeTensorMode():
            results.append(_saved_bytes_case(*shape))
    return results


def _saved_bytes_case(B: int, T: int, H: int, KV: int, hd: int) -> dict:
    import torch

    from lowmem.nn.llama import (
        DocSpans,
        attend,
        attend_efficient,
        attend_varlen,
        attention_mask_bytes,
        attention_saved_bytes,
        causal_mask,
        efficient_bias,
    )

    def qkv():
        return [torch.randn(B, n, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for n in (H, KV, KV)]

    out: dict[str, object] = {"shape": [B, T, H, KV, hd]}
    q, k, v = qkv()
    cu_seq = torch.arange(0, B * T + 1, T, dtype=torch.int32, device="cuda")
    measured = {
        "math": _saved_storages(lambda: attend(q, k, v, None)),
        "sdpa-efficient": _saved_storages(lambda: attend_efficient(q, k, v, None)),
        "varlen": _saved_storages(lambda: attend_varlen(q, k, v, DocSpans(cu_seq, T, None))),
    }
    out["varlen_cu_seq_bytes"] = measured["varlen"].pop(cu_seq.untyped_storage()._cdata, 0)
    for kernel, storages in measured.items():
        out[kernel] = {"measured": sum(storages.values()),
                       "predicted": attention_saved_bytes(kernel, B, T, H, KV, hd, 2)}
    mask = causal_mask(T, torch.device("cuda"), T // 2)[None, None].expand(B, 1, T, T)
    bias = efficient_bias(mask, torch.bfloat16)  # (B, 1, T, T), shared by both layers
    layers = [qkv() for _ in range(2)]
    two = _saved_storages(lambda: [attend_efficient(*layer, bias) for layer in layers])
    out["efficient-2-layers-masked"] = {
        "measured": sum(two.values()),
        "predicted": 2 * attention_saved_bytes("sdpa-efficient", B, T, H, KV, hd, 2)
        + attention_mask_bytes("sdpa-efficient", B, T, 2),
    }
    return out


def host_tensors_fail() -> dict:
    """A tensor left on the host fails on fake CUDA as on a GPU: returns each case's exception type and text."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.nn.llama import doc_starts, forward, init_params

    T = 32
    cfg = _config(T)
    batch = _packed_batch(T)
    n_starts = int(doc_starts(batch["doc_ids"]).sum())
    cases = {
        "cpu positions": lambda b: {**b, "positions": b["positions"].cpu()},
        "cpu doc_ids": lambda b: {**b, "doc_ids": b["doc_ids"].cpu()},
    }
    results = {}
    for kernel in ("varlen", "sdpa-efficient"):
        for name, spoil in [*cases.items(), ("cpu parameter", None)]:
            with FakeTensorMode() as mode:
                params = init_params(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
                b = {k: mode.from_tensor(v).to("cuda") for k, v in batch.items()}
                if spoil is None:
                    params["layers.1.attn.wk"] = params["layers.1.attn.wk"].cpu()
                else:
                    b = spoil(b)
                try:
                    with _square_tensors(T, n_starts):
                        forward(params, b["tokens"], cfg, positions=b["positions"], doc_ids=b["doc_ids"],
                                attention_kernel=kernel)
                    results[f"{kernel}/{name}"] = ["no error", ""]
                except Exception as e:  # noqa: BLE001  (the test asserts on the type)
                    results[f"{kernel}/{name}"] = [type(e).__name__, str(e)[:300]]
    return results


def backward_then_exit_hook(marker: str) -> str:
    """A fake-CUDA backward (it starts the autograd engine's device threads), then an atexit hook that would
    write `marker`: the child must end without the interpreter teardown that races with those threads."""
    import atexit
    from pathlib import Path

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.randn(8, 8, device="cuda", requires_grad=True)
        (w @ w).sum().backward()
    atexit.register(Path(marker).write_text, "teardown ran")
    return "ok"
