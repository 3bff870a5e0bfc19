"""Everything distributed: the process group, FSDP2 sharding, rank-0 writes, reductions.

Launch with ``torchrun --nproc_per_node N -m multipromot stage2 CONFIG``: torchrun sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and :func:`init_distributed` joins the group (gloo on
CPU, NCCL on GPUs). Run without torchrun (or with one process) and every helper here degrades
to its one-process meaning, so the training loops never branch on "am I distributed?".

Sharding is FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block is one unit,
the root (embeddings, tied LM head, final norm, the prompt table) is the last one. STACK.md
records what works on CPU: torchrun + gloo + FSDP2, ``get_model_state_dict`` full state dicts,
``dcp.save``/``dcp.load``; ``accelerate launch`` does not shard on CPU and FSDP1 segfaults on
offloaded full state dicts, so neither is used.

A model too big for one device is never materialized whole on every rank: every rank builds it
on the meta device, shards it, and only then allocates its shard; rank 0 alone reads the
weights and broadcasts them shard by shard (:func:`build_sharded`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from multipromot.errors import UserError, reports_errors  # (reports_errors: re-exported)

__all__ = [
    "init_distributed",
    "teardown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "reports_errors",
    "device",
    "barrier",
    "new_cpu_group",
    "on_rank0",
    "broadcast_object",
    "gather_object",
    "sum_across_ranks",
    "transformer_blocks",
    "shard_model",
    "is_sharded",
    "build_sharded",
    "full_state_dict",
    "gather_full_model",
    "set_gradient_sync",
    "prepare_optimizer",
    "fsdp_policies",
    "enable_activation_checkpointing",
    "iter_full_tensors",
    "PreemptionGuard",
    "PREEMPT_SIGNALS",
]

T = TypeVar("T")


# -- process group ---------------------------------------------------------------------------


def init_distributed() -> bool:
    """Join the process group torchrun describes in the environment, if there is one.

    Nothing happens for a plain ``python`` run or ``torchrun --nproc_per_node 1``: one process
    trains unsharded, which is faster and needs no group.

    Returns:
        True if this call created the group (then :func:`teardown` should destroy it).
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return True


def teardown(created: bool = True) -> None:
    """Destroy the process group if this process created it (see :func:`init_distributed`)."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and shows progress."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU under torchrun (``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def new_cpu_group() -> dist.ProcessGroup | None:
    """A new gloo group of all ranks, for collectives that run in a background thread (the
    asynchronous checkpoint's), apart from the training's; None without a process group.
    A collective: every rank creates it, in the same order."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- rank-0 work and small collectives --------------------------------------------------------


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled over the group: our own processes, small data)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: T) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_rank0(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` on rank 0 only, then let every rank continue with its result.

    This is the one way the framework writes files under a process group: only rank 0
    touches the disk, and the other ranks wait for it (the broadcast of the result is the
    barrier), so a file written here exists for every rank afterwards. If ``fn`` raises on
    rank 0, every rank raises, instead of the others hanging at the next collective.

    Returns:
        ``fn``'s result on every rank (pickled over the group: keep it small).

    Raises:
        Whatever ``fn`` raised on rank 0; on the other ranks the same UserError, or a
        RuntimeError naming any other exception.
    """
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    if not is_distributed():
        if error is not None:
            raise error
        return result
    # A UserError travels as itself (every rank exits 2; the CLI prints it once per node);
    # anything else by name.
    payload = result if error is None else (error if isinstance(error, UserError) else repr(error))
    ok, shared = broadcast_object((error is None, payload))
    if error is not None:
        raise error
    if not ok:
        if isinstance(shared, UserError):
            raise shared
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', fn)}: {shared}")
    return shared


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so token counts stay exact)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# -- FSDP2 -----------------------------------------------------------------------------------


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (T5Block, GPT2Block, LlamaDecoderLayer, ...).

    transformers lists them in ``_no_split_modules`` for its own device placement; they are
    also the natural FSDP units. ``model`` may wrap the transformers model (PromptedModel).
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fsdp_policies(mixed_precision: str = "auto", cpu_offload: bool = False) -> dict:
    """The FSDP2 keyword arguments for ``stage2.mixed_precision`` and ``stage2.cpu_offload``.

    ``auto`` is bf16 parameters with fp32 gradient reduction on GPUs that support bf16 (the
    torchtitan default: all-gathers and compute in bf16, the sharded fp32 master weights and
    the optimizer untouched) and no policy on CPUs, where it would only be slower. ``fp32``
    never casts. A GPU-less run therefore keeps today's arithmetic with the defaults.

    Returns:
        ``{"mp_policy": ..., "offload_policy": ...}`` with only the keys that apply.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    bf16 = mixed_precision == "bf16" or (
        mixed_precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    kwargs: dict = {}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block's activations in backward instead of storing them.

    Uses transformers' own per-layer switch (each block of T5, GPT-2, Llama, ... is a
    ``GradientCheckpointingLayer``) with non-reentrant ``torch.utils.checkpoint``, which keeps
    parameter names unchanged (checkpoints stay loadable either way) and works under FSDP2
    (the block's all-gather runs again for the recompute). Same arithmetic: only memory and
    time change.

    Args:
        model: a transformers model, or a module wrapping one (PromptedModel).

    Returns:
        How many blocks now recompute (0 if the model does not support it).
    """
    inner = getattr(model, "model", model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        return 0
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return sum(1 for m in inner.modules() if getattr(m, "gradient_checkpointing", False))


def shard_model(model: nn.Module, *, mp_policy=None, offload_policy=None) -> nn.Module:
    """Shard ``model`` in place with FSDP2: every transformer block, then the root.

    The root unit holds what is left: the embeddings (T5 ties them to the LM head; both stay
    in the root, where a tie cannot straddle two units), final norms, and a PromptedModel's
    prompt table (so a joint-mode prompt gets its gradient reduced like any other parameter).
    ``generate`` is registered as a forward method so it unshards the root like ``forward``.

    Args:
        model: the module to shard (a PromptedModel or a transformers model).
        mp_policy: an optional ``torch.distributed.fsdp.MixedPrecisionPolicy``.
        offload_policy: an optional ``torch.distributed.fsdp.CPUOffloadPolicy``.

    Returns:
        ``model`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    # A model without _no_split_modules gets a single (root) unit: correct, less memory saving.
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def build_sharded(
    build: Callable[[], nn.Module], source: nn.Module | None, **policies
) -> nn.Module:
    """Build a sharded model on every rank without materializing it whole but on rank 0's CPU.

    Every rank calls ``build()`` on the meta device (which keeps tied weights tied, unlike
    ``accelerate.init_empty_weights``), shards it, allocates only its own shards, and receives
    rank 0's weights through ``set_model_state_dict(..., full_state_dict=True,
    broadcast_from_rank0=True)``. Buffers that are not in the state dict (rotary frequencies
    computed at init) are copied from rank 0's ``source`` too.

    Args:
        build: returns the unsharded model structure, e.g.
            ``lambda: PromptedModel(AutoModelForSeq2SeqLM.from_config(config), prompts)``.
        source: on rank 0, the loaded model whose weights to use (same structure as
            ``build()``); None on the other ranks.
        policies: :func:`shard_model`'s ``mp_policy`` / ``offload_policy`` (see
            :func:`fsdp_policies`).

    Returns:
        The sharded model, on :func:`device`, holding ``source``'s weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = source.state_dict() if is_main() and source is not None else {}
    extra = {
        name: b.detach().cpu()
        for name, b in (source.named_buffers() if full else [])
        if name not in full
    }
    extra = broadcast_object(extra)
    with torch.device("meta"):
        model = build()
    shard_model(model, **policies)
    # With CPU offload the shards live in host memory; FSDP moves them per unit.
    model.to_empty(device="cpu" if policies.get("offload_policy") is not None else device())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in extra:
                buf.copy_(extra[name])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on rank 0's CPU; {} on other ranks.

    A collective under FSDP: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model) and not any(is_sharded(m) for m in model.modules()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def gather_full_model(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """An unsharded CPU copy of a sharded model on rank 0 (None elsewhere), for exporting.

    A collective. Rank 0 builds the structure on the meta device, takes the gathered full
    state dict's tensors as its parameters (no second copy), restores tied weights (the tie
    is one shared parameter, which loading by name would split) and copies the buffers that
    are not in the state dict.

    Args:
        model: the sharded model.
        build: returns the same structure unsharded (called on the meta device).
    """
    full = full_state_dict(model)
    if not is_main():
        return None
    with torch.device("meta"):
        copy = build()
    tied: dict[int, list[str]] = {}
    for name, param in copy.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    copy.load_state_dict(full, assign=True)
    for names in tied.values():
        first = copy.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            setattr(copy.get_submodule(owner), attr, first)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name not in full:
                owner, _, attr = name.rpartition(".")
                copy.get_submodule(owner)._buffers[attr] = buf.detach().cpu().clone()
    return copy


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP's gradient reduce-scatter on all but the last micro-batch of a step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make an optimizer work on FSDP2's DTensor parameters.

    transformers' Adafactor creates its factored second moments with ``torch.zeros(shape)``,
    a plain tensor that DTensor ops refuse to mix with the sharded gradient. A step pre-hook
    creates that state first, as DTensors shaped like the values Adafactor folds into it:
    row statistics sharded like the rows, column statistics replicated (a mean over the
    sharded dimension). The update is then the one-process update, to float rounding.
    AdamW needs nothing. Plain tensors are left to the optimizer itself.

    Returns:
        ``optimizer``.
    """
    from torch.distributed.tensor import DTensor

    if type(optimizer).__name__ != "Adafactor" or not hasattr(optimizer, "_approx_sq_grad"):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return optimizer

    def init_dtensor_state(opt, args, kwargs) -> None:
        from torch.distributed.tensor import Replicate

        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None or not isinstance(p.grad, DTensor) or opt.state[p]:
                    continue
                zeros = torch.zeros_like(p.grad, dtype=torch.float32)
                state = opt.state[p]
                state["step"] = 0
                if p.grad.dim() >= 2:
                    state["exp_avg_sq_row"] = zeros.mean(dim=-1)
                    col = zeros.mean(dim=-2)  # a partial sum across shards: make it whole
                    state["exp_avg_sq_col"] = col.redistribute(
                        placements=[Replicate()] * col.device_mesh.ndim
                    )
                else:
                    state["exp_avg_sq"] = zeros
                if group.get("beta1") is not None:
                    state["exp_avg"] = zeros.clone()
                state["RMS"] = 0

    optimizer.register_step_pre_hook(init_dtensor_state)
    return optimizer


def iter_full_tensors(module: nn.Module, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor on CPU)`` for ``names`` of ``module``'s state dict, one at a
    time, on rank 0 (other ranks yield nothing but must iterate too: a collective per tensor).

    Rank 0 never holds more than one unsharded tensor at a time (plus what the caller keeps),
    which is how a model bigger than one rank's memory is exported.
    """
    state = module.state_dict()
    for name in names:
        tensor = state[name]
        if hasattr(tensor, "full_tensor"):  # a DTensor shard: all-gather this one tensor
            tensor = tensor.full_tensor()
        if is_main():
            yield name, tensor.detach().to("cpu", copy=True)
        del tensor


# -- preemption ----------------------------------------------------------------------------

# SLURM sends SIGTERM before it kills a preempted or timed-out job (and SIGUSR1 when asked
# with `#SBATCH --signal=USR1@120`); torchrun forwards SIGTERM to its workers.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """Turn SIGTERM/SIGUSR1 into a flag the training loop checks between steps.

    The handler only records the signal, so the current step (forward, backward, optimizer,
    logging, validation, save) finishes undisturbed. :meth:`stop_requested` is a collective:
    if any rank got a signal, every rank learns it at the same step and they stop together
    (a scheduler may signal only some of the processes). Use as a context manager; the
    previous handlers come back on exit. Outside the main thread it installs nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def stop_requested(self) -> int | None:
        """The signal number if any rank was signalled (the same answer on every rank)."""
        if not is_distributed():
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
