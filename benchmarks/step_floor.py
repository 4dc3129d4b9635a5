"""The constants of the speed model's per-step floor (lowmem.plan.estimate.step_floor_seconds), measured here.

Prints a table: aten ops (views left out) and saved tensors per block's forward + backward, counted over
lowmem.nn.llama.forward at negligible compute (dim 16, 8 tokens, packed-document SDPA); host seconds per block
(the slope between 2 and 10 layers, best of 30); torch AdamW's step time per tensor (single-tensor and foreach
paths, 4-element tensors). One thread: `python benchmarks/step_floor.py`.
"""

import time

import msgspec
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.nn.config import preset
from lowmem.nn.llama import forward, init_params

VIEWS = {"detach", "view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "reshape", "permute", "slice",
         "select", "alias", "split", "squeeze", "as_strided", "unbind"}


class CountOps(TorchDispatchMode):
    """Counts the aten ops that compute (one kernel at least on CUDA), not the views."""

    def __init__(self):
        super().__init__()
        self.n_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n_ops += func._overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


def small_model(n_layers: int):
    cfg = msgspec.structs.replace(preset("tiny"), n_layers=n_layers, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                  vocab_size=32)
    params = {k: v.requires_grad_(True) for k, v in init_params(cfg, 0).items()}
    return cfg, params, torch.zeros(1, 8, dtype=torch.long)


def step(n_layers: int, counter=None, pack=None) -> float:
    """Seconds of one forward + backward; ops counted into `counter`, saved tensors through `pack`."""
    cfg, params, tokens = small_model(n_layers)
    start = time.perf_counter()
    with counter or torch.autograd.graph.saved_tensors_hooks(pack or (lambda t: t), lambda t: t):
        forward(params, tokens, cfg, doc_ids=tokens, training=True).sum().backward()
    return time.perf_counter() - start


def per_block(measure) -> float:
    return (measure(10) - measure(2)) / 8


def adamw_seconds_per_tensor(foreach: bool, n: int = 100) -> float:
    params = [torch.zeros(4, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.zeros(4)
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
    opt.step()
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - start)
    return best / n


def count_ops(n_layers: int) -> int:
    counter = CountOps()
    step(n_layers, counter=counter)
    return counter.n_ops


def count_saved(n_layers: int) -> int:
    saved = []
    step(n_layers, pack=lambda t: saved.append(1) or t)
    return len(saved)


def main() -> None:
    torch.set_num_threads(1)
    ops, saved = per_block(count_ops), per_block(count_saved)
    seconds = per_block(lambda n: min(step(n) for _ in range(30)))
    print("| what | value |\n| --- | --- |")
    print(f"| aten ops per block, forward + backward | {ops:.0f} |")
    print(f"| aten ops outside the blocks (embedding, final norm, loss) | {count_ops(2) - 2 * ops:.0f} |")
    print(f"| saved tensors per block | {saved:.0f} |")
    print(f"| host seconds per block | {seconds * 1e6:.0f} us ({seconds / ops * 1e6:.1f} us per op) |")
    print(f"| AdamW single-tensor step per tensor | {adamw_seconds_per_tensor(False) * 1e6:.1f} us |")
    print(f"| AdamW foreach step per tensor | {adamw_seconds_per_tensor(True) * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
