"""Data-parallel training with FSDP2: the process group, rank helpers, and the module shell FSDP shards.

`torchrun --nproc_per_node N -m lowmem.cli execute SPEC` starts N processes; each reads only the variables
torchrun defines (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) to join the group. Parameters stay
a flat dict of canonical names used by the pure `forward(params, ...)`; `ParamShell` only *holds* them as
`nn.Parameter`s in a module tree that mirrors the names (`layers.3.attn.wq` is
`shell.get_submodule("layers.3.attn").wq`), because `torch.distributed.fsdp.fully_shard` shards modules. A
tensor whose name extends another's (the adapter `layers.3.attn.wq.lora_a` of `layers.3.attn.wq`) sits beside
it as `wq:lora_a`: a module attribute cannot be a parameter and a holder at once. Each block `layers.{i}` is one
FSDP unit (its base weights and adapters together), the root (embeddings, final norm, output) another, as
torchtitan and torchtune do. Frozen tensors (a LoRA base) are sharded too, with `requires_grad=False`.

FSDP2 swaps a unit's registered parameters between sharded DTensors and full tensors in the unit's forward
pre-hook, so the full weights of block i exist only while block i's holder runs its forward. `run_block`
below routes each call of forward's per-layer seam through that module.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from lowmem.nn.config import ModelConfig
from lowmem.nn.llama import AdaptedWeight, block_param_names

# joins the parts of a name below a tensor that is itself named (see the module docstring); canonical names
# never contain it
NESTED = ":"


def world_size() -> int:
    """Processes in the default group; 1 when none was started."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when none was started."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher setting its variables) started this process with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_world_size() -> int:
    """The process count torchrun gave this process (WORLD_SIZE), before or without a process group; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    """The rank torchrun gave this process (RANK), before or without a process group; 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the group torchrun described (gloo on CPU, NCCL on CUDA) for the block; no-op in a single process.

    A group already initialized by the caller is used as it is and left open.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise ValueError("torchrun started several processes but this torch build has no torch.distributed; "
                         "run a single process, or install a torch build with distributed support")
    kwargs = {}
    if device == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        kwargs["device_id"] = local
    # reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (env://)
    dist.init_process_group(backend=backend_for(device), **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def backend_for(device: str) -> str:
    """The process group's backends: gloo on CPU; on CUDA NCCL for device tensors and gloo for host ones.

    FSDP's collectives move CUDA tensors (NCCL); the few scalars the loop and checkpoints agree on (a step's loss
    and token count, a stop request, a failed write) are host float64 tensors, which NCCL rejects: gloo takes them.
    """
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum each value over ranks, in float64 (identity in a single process)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a DTensor (an FSDP-sharded parameter or gradient)."""
    if t is None or not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class _Holder(nn.Module):
    """A node of the shell's tree: parameters and child holders only."""

    def forward(self, fn: Callable, *args):
        return fn(self, *args)


class ParamShell(_Holder):
    """Holds the tensors of a params dict as parameters under their canonical names; no logic.

    `shell(fn, *args)` returns `fn(shell, *args)`: FSDP's hooks run around it, and `fn` reads the
    tensors it needs (`named_params(shell)`) while they are full.
    """

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in params.items():
            *path, leaf = _shell_name(name, params).split(".")
            node: nn.Module = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, _Holder())
                node = getattr(node, part)
            node.register_parameter(leaf, nn.Parameter(tensor, requires_grad=tensor.requires_grad))


def _shell_name(name: str, params: dict[str, torch.Tensor]) -> str:
    """`name` with the parts below its longest prefix that is a tensor of `params` joined by NESTED."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in params:
            return ".".join(parts[:k]) + NESTED + NESTED.join(parts[k:])
    return name


def layer(shell: ParamShell, i: int) -> nn.Module:
    """The holder of the `layers.{i}.*` tensors."""
    return getattr(shell.layers, str(i))


def named_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's current parameters by canonical name (full or sharded, as FSDP left them right now)."""
    return {name.replace(NESTED, "."): t for name, t in module.named_parameters()}


def shard(params: dict[str, torch.Tensor], n_layers: int, device: str, *, compute_dtype: torch.dtype | None = None,
          offload: bool = False) -> ParamShell:
    """Put `params` (identical on every rank) in a shell and shard it: each block, then the root.

    The blocks reshard after forward (their full weights are gathered again in backward); the root keeps its
    full weights from forward to backward (`reshard_after_forward=False`): it is needed first in backward.

    `compute_dtype` (mixed precision: fp32 masters, 16-bit compute): FSDP's `MixedPrecisionPolicy` casts each
    block's shards to it before the all-gather, so a block is gathered, computed and held in 16 bits, and its
    gradients are reduce-scattered in fp32 into the fp32 shards. Blocks only: the root (embeddings, final norm,
    output head) computes in its master dtype, as in one process. The in-block cast of
    `lowmem.train.strategies` then finds the weights already in the compute dtype and copies nothing.
    `offload` (`CPUOffloadPolicy`): the shards, their gradients and the optimizer step live in host memory;
    each unit's shards are copied to the device for its all-gather. Pinned only on CUDA.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    shell = ParamShell(params)
    mesh = init_device_mesh(device, (world_size(),))
    policy = CPUOffloadPolicy(pin_memory=device == "cuda") if offload else OffloadPolicy()
    mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    for i in range(n_layers):
        fully_shard(layer(shell, i), mesh=mesh, offload_policy=policy,
                    **({"mp_policy": mixed} if mixed else {}))
    fully_shard(shell, mesh=mesh, reshard_after_forward=False, offload_policy=policy)
    return shell


def block_runner(shell: ParamShell, cfg: ModelConfig, inner: Callable[..., torch.Tensor] | None,
                 after_reshard: Callable[[], None] | None = None):
    """The `run_block` seam of `forward` for a sharded shell.

    `forward` hands the seam the layer's weights as it read them from the params dict, i.e. the sharded
    parameters of block i's holder (an adapted weight as an `AdaptedWeight` of sharded tensors); the first one
    identifies the block. The call then goes through that block's module, so FSDP gathers its weights, and
    `block_fn` gets the full ones, in the same order and form (then `inner`, e.g. activation checkpointing,
    wraps it as in a single process).

    `after_reshard` is called after block i's forward and, in backward, once block i+1's gradients are reduced
    (both right after FSDP freed the block's full weights): FSDP frees them by resizing their storage, which
    no dispatched op shows, so a memory tracker re-reads its storages there (`LiveTensorTracker.resync`).
    """
    names = block_param_names(cfg)
    block_of = {id(getattr(layer(shell, i), names[0])): i for i in range(cfg.n_layers)}

    def run_block(block_fn: Callable[..., torch.Tensor], h: torch.Tensor, *tensors):
        i = block_of.get(id(tensors[0]))
        assert i is not None, "run_block got weights that are not a block's sharded parameters"
        module = layer(shell, i)
        sharded = tensors[:len(names)]

        def call(module: nn.Module, h: torch.Tensor, cos, sin, mask) -> torch.Tensor:
            full = named_params(module)  # inside the module's forward: FSDP has gathered them
            weights = [_gathered(full, name, w) for name, w in zip(names, sharded, strict=True)]
            if inner is None:
                return block_fn(h, *weights, cos, sin, mask)
            return inner(block_fn, h, *weights, cos, sin, mask, layer=i)  # gathered copies: say which block

        out = module(call, h, *tensors[len(names):])
        if after_reshard is not None:
            after_reshard()
            h_out = out[0] if isinstance(out, tuple) else out  # a sparse block also returns its router stats
            if h_out.requires_grad:  # runs after FSDP's own hook on the output (block i's pre-backward)
                h_out.register_hook(lambda grad: after_reshard())
        return out

    return run_block


def _gathered(full: dict[str, torch.Tensor], name: str, sharded):
    """The gathered form of one weight `forward` passed (a tensor, or an `AdaptedWeight` keeping its floats)."""
    if isinstance(sharded, AdaptedWeight):
        return sharded._replace(weight=full[name], lora_a=full[name + ".lora_a"], lora_b=full[name + ".lora_b"],
                                dora_m=full.get(name + ".dora_m"))
    return full[name]



def gather_full(params: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Sharded params gathered in full, one tensor per collective (every rank must call this).

    Only a rank with `keep` holds the full tensors afterwards; the others drop each as soon as it is gathered.
    """
    full = {}
    for name, t in params.items():
        gathered = _waited(t.detach().full_tensor())
        if keep:
            full[name] = gathered
        del gathered
    return full


def _waited(t: torch.Tensor) -> torch.Tensor:
    """`t` with every all-gather behind it waited on (and so unregistered from c10d's work registry).

    `DTensor.full_tensor()` waits on its result only when the result itself is an `AsyncCollectiveTensor`. For a
    torchao NF4Tensor (a QLoRA base weight) it is an NF4Tensor whose three inner tensors (codes, scales, scale
    factor) are each an unwaited AsyncCollectiveTensor: the values are right (any op on one waits first), but
    each gloo work stays in c10d's process-wide work registry until the registry's static destructor runs at
    process exit, after the interpreter is gone ("At the time of process termination, there are still 42
    unwaited collective calls": 14 NF4 weights x 3 of the tiny model). `wait_tensor` on the NF4Tensor (torchao
    implements it) waits on each inner one and returns plain inner tensors.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if isinstance(t, AsyncCollectiveTensor):
        return t.wait()
    if is_traceable_wrapper_subclass(t) and any(
            isinstance(getattr(t, inner), AsyncCollectiveTensor) for inner in t.__tensor_flatten__()[0]):
        return torch.ops._c10d_functional.wait_tensor(t)
    return t
