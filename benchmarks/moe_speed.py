"""Training tokens/s of a tiny Qwen3-MoE against a dense model with the same active parameters, side by side.

    PYTHONPATH=src python benchmarks/moe_speed.py [--threads 2] [--repeats 5]

Both models share everything but the MLP: the MoE routes each token to k = 2 of 16 experts of hidden size 256,
the dense model has one MLP of 2 x 256 = 512 (so the same expert FLOPs per token; the router's 16 x 256 weights
per layer are 1% on top). One step = forward, cross-entropy, backward (full fine-tuning), timed as the median
of `repeats` alternating runs after a warm-up. The MoE runs once with torch._grouped_mm (what lowmem picks on
this CPU) and once with the per-expert loop it falls back to.
"""

import argparse
import statistics
import time
from unittest import mock

import torch

from lowmem.nn.config import ModelConfig
from lowmem.nn.llama import forward_with_router_loss, init_params, output_weight
from lowmem.nn.loss import cross_entropy_sum

COMMON = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, family="qwen3_moe", qk_norm="head")
MOE = ModelConfig(**COMMON, ffn_dim=512, n_experts=16, n_experts_per_token=2, expert_ffn_dim=256)
DENSE = ModelConfig(**COMMON, ffn_dim=512)  # qwen3_moe with no experts: every layer dense


def step_seconds(cfg: ModelConfig, params, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    hidden, aux = forward_with_router_loss(params, tokens, cfg)
    loss_sum, n = cross_entropy_sum(hidden[:, :-1], output_weight(params, cfg), tokens[:, 1:])
    loss = loss_sum / n + (0.001 * aux if aux is not None else 0)
    loss.backward()
    for p in params.values():
        p.grad = None
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    n_tok = tokens.numel()
    print(f"threads {args.threads}, {args.batch} x {args.seq} tokens per step, median of {args.repeats}")
    print(f"{'dtype':8} {'dense tok/s':>12} {'moe grouped':>12} {'moe loop':>12} {'grouped/dense':>14} {'loop/dense':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        runs = {"dense": [], "grouped": [], "loop": []}
        models = {name: init_params(cfg, seed=0, dtype=dtype) for name, cfg in (("dense", DENSE), ("moe", MOE))}
        for p in (*models["dense"].values(), *models["moe"].values()):
            p.requires_grad_(True)
        for i in range(args.repeats + 1):
            t_dense = step_seconds(DENSE, models["dense"], tokens)
            t_grouped = step_seconds(MOE, models["moe"], tokens)
            with mock.patch("lowmem.nn.moe.grouped_mm_supported", return_value=False):
                t_loop = step_seconds(MOE, models["moe"], tokens)
            if i:  # the first round warms up
                runs["dense"].append(t_dense)
                runs["grouped"].append(t_grouped)
                runs["loop"].append(t_loop)
        tps = {k: n_tok / statistics.median(v) for k, v in runs.items()}
        print(f"{str(dtype).removeprefix('torch.'):8} {tps['dense']:12.0f} {tps['grouped']:12.0f} {tps['loop']:12.0f} "
              f"{tps['grouped'] / tps['dense']:14.2f} {tps['loop'] / tps['dense']:11.2f}")


if __name__ == "__main__":
    main()
