"""What a LoRA/DoRA adapter is: `LoraSettings` and the projections it may target (`TARGETS`).

Its own module, depending on no other part of lowmem, so that both the model (`lowmem.nn.llama.forward` takes
the settings) and the adapter transforms (`lowmem.nn.lora`, which re-exports both names and builds on the
model's `linear` math) can import it without importing each other.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["EXPERT_TARGETS", "TARGETS", "LoraSettings", "target_names"]

# Short target name → the per-layer canonical name it adapts.
TARGETS = {
    "wq": "attn.wq", "wk": "attn.wk", "wv": "attn.wv", "wo": "attn.wo",
    "w1": "mlp.w1", "w2": "mlp.w2", "w3": "mlp.w3",
}
# In a mixture-of-experts layer the MLP targets select its stacked experts (`lowmem.nn.moe`); the router is
# never a target.
EXPERT_TARGETS = {"w1": "moe.w1", "w2": "moe.w2", "w3": "moe.w3"}


def target_names(cfg: Any, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Canonical names of the weights the short `targets` select in `cfg` (a `ModelConfig`), layer by layer in
    `TARGETS` order: a sparse layer's w1, w2, w3 are its experts (`EXPERT_TARGETS`)."""
    names = []
    for i in range(cfg.n_layers):
        per_layer = EXPERT_TARGETS if cfg.is_moe_layer(i) else {}
        names += [f"layers.{i}.{per_layer.get(t, TARGETS[t])}" for t in TARGETS if t in targets]
    return names


class LoraSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an adapter is: rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's
    input during training, which projections it adapts (short names, see `TARGETS`), and DoRA or not.

    PEFT's `LoraConfig(r, lora_alpha, lora_dropout, target_modules, use_dora)` in lowmem's names.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank = {self.rank!r}: must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha = {self.alpha!r}: must be a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout!r}: must be a number in [0, 1)")
        if not self.targets:
            raise ValueError(f"targets = (): name at least one of {sorted(TARGETS)}")
        for t in self.targets:
            if t == "output":
                # The output projection is fused into the loss (`cross_entropy_sum(hidden, weight, ...)`
                # takes a weight matrix), so an adapter there would be skipped by training's loss.
                raise ValueError(
                    "targets: 'output' is not supported; the output projection goes into the loss as a "
                    f"plain weight matrix. Choose from {sorted(TARGETS)}"
                )
            if t not in TARGETS:
                raise ValueError(f"targets: unknown target {t!r}; known: {sorted(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets = {list(self.targets)}: each target may appear once")

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B @ A (LoRA paper, section 4.1; PEFT's `scaling`)."""
        return self.alpha / self.rank
