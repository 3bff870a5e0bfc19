"""A per-rank memory plan for stage 2 under FSDP2, from the model's shapes alone.

The model is built on the meta device (no weights read, nothing allocated), so a 70B config
plans in seconds on a laptop. What each rank holds, for ``world = nodes x gpus`` ranks:

- **parameters**: FSDP2 shards every parameter along dim 0 and pads it to a multiple of the
  world size, so a rank holds ``ceil(d0 / world) * (d1 * ...)`` elements of each, in the
  parameters' dtype (the model's own, float32 if it names none);
- **gradients**: the same shards, same dtype;
- **optimizer state**: AdamW keeps two full-size moments per shard; Adafactor (no momentum,
  factored second moments, as stage 2 builds it) keeps per matrix the row means of the shard
  and the replicated column means (:func:`multipromot.train.distributed.prepare_optimizer`),
  per vector a full second moment;
- **all-gathered units**: while a unit computes, its parameters are whole on every rank in the
  compute dtype (bf16 under ``mixed_precision`` auto/bf16 on GPUs): the root unit
  (embeddings, LM head, final norms: FSDP2 keeps it unsharded from forward to backward), two
  transformer blocks (the one computing and the one prefetched) and their gradients before
  the reduce-scatter;
- **activations**: an *estimate* per micro-batch: the tensors autograd keeps for backward,
  counted term by term for the layers of T5/mT5 and Llama-like blocks (RMS norms kept in
  fp32, q/k/v/context, the MLP's branches, dropout masks, eager attention scores, cross
  attention, the logits and the loss's fp32 log-softmax; :func:`_activations`), in the
  spirit of Korthikanti et al. (2022, "Reducing activation recomputation in large
  transformer models"). With activation checkpointing a block keeps only its input
  (``e * h`` per token) and one block's activations exist again during its recompute.
  Checked on CPU (fp32, the CPU's dropout masks) against what autograd saves: within 1% for
  small T5, mT5 (gated gelu_new) and Llama shapes (tests/test_plan.py). Not checked on a
  GPU: bf16 casts, fused kernels and the allocator's transient buffers (the gradients of the
  activations during backward, workspace) are not in it.

It fits when the sum is at most 90% of the GPU (the rest is for the CUDA context, NCCL
buffers and allocator fragmentation). tests/test_plan.py checks the parameter figures
against FSDP2's own sharding (meta device, a fake process group of 8 and 64 ranks) and the
parameter + optimizer figures against memory measured on CPU, and the activation figures
against autograd's saved tensors on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from multipromot.config import RunConfig, model_seed, resolve_path
from multipromot.errors import UserError
from multipromot.methods import method_kind
from multipromot.models import BUILTIN_MODELS, build_builtin, default_cache_dir
from multipromot.train.distributed import transformer_blocks

__all__ = ["MemoryPlan", "plan_memory", "meta_model", "shard_elements", "optimizer_elements"]

GB = 1e9
USABLE = 0.9  # share of a GPU's memory the plan may fill


def meta_model(spec: str, seed: int = 0) -> nn.Module:
    """``spec``'s model built on the meta device from its config alone.

    Args:
        spec: a built-in model name, a local directory with a ``config.json`` (weights are not
            needed), or a hub id in the local cache.

    Raises:
        UserError: no config can be found for ``spec``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = None
    if spec in BUILTIN_MODELS:
        cached = default_cache_dir() / "models" / f"{spec}-seed{seed}"
        if (cached / "config.json").is_file():
            config = AutoConfig.from_pretrained(cached)
        else:
            try:
                config = build_builtin(spec, seed)[0].config  # the tiny ones build in a blink
            except UserError:
                raise UserError(
                    f"built-in model {spec!r} is not built yet; run stage 1 or "
                    "`multipromot lab` first",
                    key="model",
                ) from None
    else:
        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"cannot read the config of {spec!r} ({first}); a directory holding "
                "only config.json is enough",
                key="model",
            ) from None
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype if isinstance(dtype, torch.dtype) else None)


def shard_elements(shape: torch.Size | tuple[int, ...], world: int) -> int:
    """Elements one rank holds of a parameter FSDP2 shards over ``world`` ranks (dim 0,
    padded to a multiple of ``world``)."""
    if len(shape) == 0:
        return 1
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world) * rest


def optimizer_elements(shape: tuple[int, ...], world: int, optimizer: str) -> int:
    """Optimizer-state elements one rank holds for a parameter of ``shape``."""
    local = shard_elements(shape, world)
    if optimizer == "adamw":
        return 2 * local
    if len(shape) >= 2:  # Adafactor: row means of the shard + the replicated column means
        rows = local // shape[-1]
        cols = math.prod(shape[:-2]) * shape[-1]
        return rows + cols
    return local


@dataclass
class MemoryPlan:
    """Per-rank bytes of a stage-2 run (see the module docstring for what each one counts)."""

    model: str
    parameters_total: int
    world: int
    gpu_bytes: float
    rows: int
    seq: dict
    compute_dtype: str
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gathered_bytes: int
    activation_bytes: int
    activation_ckpt_bytes: int
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool) -> int:
        act = self.activation_ckpt_bytes if checkpointing else self.activation_bytes
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.gathered_bytes + act

    def fits(self, checkpointing: bool) -> bool:
        return self.total(checkpointing) <= USABLE * self.gpu_bytes

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "parameters": self.parameters_total,
            "world_size": self.world,
            "gpu_gb": self.gpu_bytes / GB,
            "rows_per_rank": self.rows,
            "seq": self.seq,
            "compute_dtype": self.compute_dtype,
            "parameters_gb": self.param_bytes / GB,
            "gradients_gb": self.grad_bytes / GB,
            "optimizer_gb": self.optimizer_bytes / GB,
            "all_gathered_gb": self.gathered_bytes / GB,
            "activations_gb": self.activation_bytes / GB,
            "activations_checkpointed_gb": self.activation_ckpt_bytes / GB,
            "total_gb": self.total(False) / GB,
            "total_checkpointed_gb": self.total(True) / GB,
            "fits": self.fits(False),
            "fits_checkpointed": self.fits(True),
            "notes": self.notes,
        }

    def table(self) -> str:
        """The plan as a small text table (GB = 1e9 bytes)."""
        usable = USABLE * self.gpu_bytes / GB
        lines = [
            f"{self.model}: {self.parameters_total / 1e9:.2f}B parameters on {self.world} "
            f"rank(s), {self.gpu_bytes / GB:g} GB each ({usable:.1f} GB usable)",
            f"micro-batch {self.rows} row(s)/rank, sequence {self.seq}, compute {self.compute_dtype}",
            f"{'per rank':34} {'GB':>8}",
            f"{'parameters (sharded)':34} {self.param_bytes / GB:8.2f}",
            f"{'gradients (sharded)':34} {self.grad_bytes / GB:8.2f}",
            f"{'optimizer state (sharded)':34} {self.optimizer_bytes / GB:8.2f}",
            f"{'all-gathered units + their grads':34} {self.gathered_bytes / GB:8.2f}",
            f"{'activations (estimate)':34} {self.activation_bytes / GB:8.2f}",
            f"{'  with activation checkpointing':34} {self.activation_ckpt_bytes / GB:8.2f}",
        ]
        for ckpt in (False, True):
            label = "total, activation checkpointing" if ckpt else "total"
            verdict = "fits" if self.fits(ckpt) else "does NOT fit"
            lines.append(f"{label:34} {self.total(ckpt) / GB:8.2f}  {verdict}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# What a plan may assume: beyond these, a figure would describe no machine (a million nodes,
# infinite memory) and still print "fits".
MAX_NODES = 10_000
MAX_GPUS = 64  # ranks per machine
MAX_GPU_GB = 4096.0


def plan_memory(
    cfg: RunConfig,
    *,
    nodes: int,
    gpus: int,
    gpu_gb: float = 80.0,
    model: nn.Module | None = None,
    cpu_kernels: bool = False,
) -> MemoryPlan:
    """Plan stage 2 of ``cfg`` on ``nodes x gpus`` ranks of ``gpu_gb`` GB each.

    Args:
        cfg: the run config (``model``, ``stage1.prompt_length``, ``stage2.*``).
        nodes: machines.
        gpus: GPUs (ranks) per machine.
        gpu_gb: memory of one GPU in GB (1e9 bytes).
        model: the model on the meta device (default: built from ``cfg.model``).
        cpu_kernels: count activations as the CPU's kernels keep them (see
            :func:`_activations`; for checking the estimate on CPU).

    Returns:
        The :class:`MemoryPlan`.

    Raises:
        UserError: a count or size not in (0, MAX_*] (a million nodes, infinite memory), or a
            model whose config cannot be read.
    """
    for key, value, top in (
        ("--nodes", nodes, MAX_NODES),
        ("--gpus", gpus, MAX_GPUS),
        ("--gpu-memory", gpu_gb, MAX_GPU_GB),
    ):
        if not 0 < value <= top:  # also refuses NaN and infinity
            raise UserError(f"must be > 0 and at most {top:g}, got {value}", key=key)
    s2 = cfg.stage2
    model = meta_model(resolve_path(cfg, cfg.model), model_seed(cfg)) if model is None else model
    world = nodes * gpus
    notes = []
    rows = s2.batch_size // (s2.grad_accum * world)
    if rows == 0 or s2.batch_size % (s2.grad_accum * world):
        notes.append(
            f"stage2.batch_size {s2.batch_size} does not split over grad_accum "
            f"{s2.grad_accum} x {world} ranks; planned with 1 row per rank"
        )
        rows = max(rows, 1)

    params = dict(model.named_parameters())  # tied weights once
    param_dtype = next(iter(params.values())).dtype
    p_size = torch.finfo(param_dtype).bits // 8
    gpu_bf16 = s2.mixed_precision in ("auto", "bf16")
    compute_dtype = "bfloat16" if gpu_bf16 else str(param_dtype).removeprefix("torch.")
    c_size = 2 if gpu_bf16 else p_size

    local = sum(shard_elements(tuple(p.shape), world) for p in params.values())
    opt = sum(optimizer_elements(tuple(p.shape), world, s2.optimizer) for p in params.values())
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in params.values() if id(p) not in in_blocks)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    gathered = 2 * (root + 2 * largest) * c_size  # parameters + their unsharded gradients

    act, act_ckpt, seq = _activations(model, cfg, rows, c_size, cpu_kernels)
    if getattr(model.config, "_attn_implementation", "") == "eager":
        notes.append("eager attention: the s x s attention scores are counted")
    notes.append(
        "activations: what autograd keeps, checked on CPU only (within 1% for "
        "small T5/mT5/Llama); not transient buffers; measure with benchmarks/gpu.py"
    )
    return MemoryPlan(
        model=f"{cfg.model} ({model.config.model_type})",
        parameters_total=sum(p.numel() for p in params.values()),
        world=world,
        gpu_bytes=gpu_gb * GB,
        rows=rows,
        seq=seq,
        compute_dtype=compute_dtype,
        param_bytes=local * p_size,
        grad_bytes=local * p_size,
        optimizer_bytes=opt * 4,
        gathered_bytes=gathered,
        activation_bytes=act,
        activation_ckpt_bytes=act_ckpt,
        notes=notes,
    )


def _activations(
    model: nn.Module, cfg: RunConfig, rows: int, e: int, cpu_kernels: bool = False
) -> tuple[int, int, dict]:
    """(bytes without checkpointing, bytes with, the sequence lengths) for one micro-batch.

    Counts, per token, what autograd keeps for backward (``e``-byte activations, ``h`` the
    hidden size, ``m``-byte dropout masks, 0 without dropout):

    - every RMS norm (T5, Llama): its input and normalised value in fp32 (``8h``) and its
      output, the next projection's input (``e h``);
    - attention: q, k, v and the context (``4 e h``), the output's dropout mask (``m h``);
      for eager attention, per head and key the softmax output (``e``) and with attention
      dropout its mask and the dropped-out probabilities (``m + e``); SDPA's fused kernels
      keep no scores;
    - a decoder's cross attention: the same over the input, whose k and v every decoder
      block keeps (``2 e h`` per input token);
    - the MLP: the activation's input or output, the down projection's input and its mask
      (``(2e + m) ff``); gated (T5 v1.1/mT5, Llama): also the other branch and the
      activation's output (``+ 2 e ff``); ``gelu_new`` (T5 v1.1/mT5, GPT-2) is built from
      elementwise ops that keep three more ff-wide tensors (``+ 3 e ff``); the output's mask
      (``m h``);
    - per stack: the final norm and the embedding and final dropout masks;
    - the logits: ``e V`` per target position, an fp32 copy when ``e < 4`` (token_loss
      computes in fp32), and the fp32 log-softmax the loss keeps (``4 V``).

    GPUs (the default): fused dropout keeps 1-byte masks. ``cpu_kernels``: the CPU's dropout
    keeps ``e``-byte masks (how tests/test_plan.py checks these figures against the tensors
    autograd saves on CPU). With activation checkpointing a block keeps only its input
    (``e h`` per token) and one block's activations exist again during its recompute.
    """
    c = model.config
    s2 = cfg.stage2
    h = getattr(c, "d_model", None) or c.hidden_size
    ff = getattr(c, "d_ff", None) or getattr(c, "intermediate_size", None) or 4 * h
    heads = getattr(c, "num_heads", None) or c.num_attention_heads
    gated = bool(getattr(c, "is_gated_act", False)) or c.model_type == "llama"
    act = (
        getattr(c, "dense_act_fn", None)
        or getattr(c, "hidden_act", None)
        or getattr(c, "activation_function", "")
    )
    eager = getattr(c, "_attn_implementation", "") == "eager"
    mask = e if cpu_kernels else 1
    m = mask if _dropout(c, _HIDDEN_DROPOUT) > 0 else 0
    m_attn = mask if _dropout(c, _ATTENTION_DROPOUT) > 0 else 0
    score = e + (m_attn + e if m_attn else 0)  # per head and key, eager attention only
    # the kinds without a prompt table (standard, hft, the LoRA kinds) prepend nothing
    prompt = cfg.stage1.prompt_length if method_kind(s2.mode).prompted else 0
    norm = 8 * h + e * h

    def attention(kv: int) -> float:
        return norm + 4 * e * h + m * h + (score * heads * kv if eager else 0)

    ff_bytes = 2 * e + m + (2 * e if gated else 0) + (3 * e if act == "gelu_new" else 0)
    mlp = norm + ff_bytes * ff + m * h
    stack = norm + 2 * m * h  # final norm, embedding and final dropout

    def block(s: int, kv: int, cross: int = 0) -> float:
        per_token = attention(kv) + mlp
        if cross:  # queries over the decoder's tokens, keys and values over the input's
            per_token += attention(cross) - 2 * e * h
        return rows * (s * per_token + (2 * e * h * cross if cross else 0))

    vocab = c.vocab_size
    if c.is_encoder_decoder:
        s_in, s_out = prompt + s2.max_input_length, s2.max_target_length
        n_enc = c.num_layers
        n_dec = getattr(c, "num_decoder_layers", None) or n_enc
        enc, dec = block(s_in, s_in), block(s_out, s_out, cross=s_in)
        stacks = rows * (s_in + s_out) * stack
        full = n_enc * enc + n_dec * dec + stacks
        kept = (n_enc * s_in + n_dec * s_out) * rows * h * e + max(enc, dec) + stacks
        seq = {"input": s_in, "target": s_out}
    else:
        s = prompt + s2.max_input_length + s2.max_target_length
        s_out = s
        n = c.num_hidden_layers
        stacks = rows * s * stack
        full = n * block(s, s) + stacks
        kept = n * s * rows * h * e + block(s, s) + stacks
        seq = {"tokens": s}
    logits = rows * s_out * vocab * (e + (4 if e < 4 else 0) + 4)
    return int(full + logits), int(kept + logits), seq


def _dropout(config, keys: tuple[str, ...]) -> float:
    return max(float(getattr(config, k, 0.0) or 0.0) for k in keys)


# Where transformers configs keep their hidden and attention dropout probabilities.
_HIDDEN_DROPOUT = ("dropout_rate", "resid_pdrop", "hidden_dropout", "hidden_dropout_prob")
_ATTENTION_DROPOUT = (
    "dropout_rate",
    "attn_pdrop",
    "attention_dropout",
    "attention_probs_dropout_prob",
)
