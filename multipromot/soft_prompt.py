"""PromptedModel: one per-row soft-prompt injection path for seq2seq and decoder-only models.

Every batch row names its task through ``task_ids`` (a LongTensor [B]); row ``t >= 0`` gets
``prompts[t]`` (P learned embeddings) in front of its input embeddings, row ``-1`` gets no
prompt. The same code path serves T5/mT5 (prompt in front of the encoder input) and GPT-2/Llama
(prompt between the left padding and the text), for ``forward`` and for ``generate``.

Layouts (``.`` = masked position, ``p`` = prompt, ``t`` = text):

- seq2seq, right padding: prompted row ``p p t t t .``; no-prompt row in a mixed batch
  ``. . t t t .`` (P masked placeholders). T5's relative position bias depends only on the
  distance between unmasked tokens, so the placeholders change nothing.
- decoder-only, left padding: prompted row ``. p p t t t``; no-prompt row ``. . . t t t``.
  Position ids are counted over unmasked positions only (as ``generate`` does), so a no-prompt
  row sees exactly the positions of the bare model on its unpadded text.

When no row of a batch has a prompt (``task_ids`` None or all ``-1``) no prompt positions are
added at all.

Prefix caching (decoder-only ``generate(..., prefix_cache=True)``): a task's prompt is the same
P positions at the start of every prompted row, and causal attention makes their keys and values
depend on the prompt alone. They are computed once per (weights, task), kept, and handed to
``generate`` in a ``DynamicCache`` laid out ``p p | . t t t`` (no-prompt rows: ``x x | . . t t t``
with the ``x`` slots masked). Keys see the same unmasked positions and position ids as in the
prepend layout, so the outputs are the prepend path's (up to float summation order; tests compare
tokens and scores). The kept prefixes are dropped when a weight changes (data pointer or in-place
version counter of any parameter or buffer) or a prompt row's values change (compared by value).
The text but its last token also enters the cache before ``generate`` starts, run in groups of
rows of similar length so that short rows do not pay for the padding of long ones.

Seq2seq ``generate`` on a CPU runs the encoder a group of rows at a time (each group's
activations stay in the caches) and decodes the whole batch; bit for bit the same outputs.

Returned logits are aligned with ``input_ids`` (decoder-only) or with ``labels`` (seq2seq):
callers never see the P prompt positions in logits. Other outputs (hidden states, attentions,
``past_key_values``, the seq2seq encoder states) keep them.

This module runs past 500 lines because the cached layout must stay the prepend layout's twin:
both are drawn here and built next to each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multipromot.features import IGNORE_INDEX

__all__ = ["PromptedModel", "init_prompts", "TRAINABLE_MODES", "VOCAB_SAMPLE_SIZE"]

TRAINABLE_MODES = ("prompt", "model", "both")

# Lester et al. (2021) sample vocabulary initializations from the 5,000 most common tokens;
# sentencepiece vocabularies are roughly frequency-ordered, so the first ids stand in for them.
VOCAB_SAMPLE_SIZE = 5000


class PromptedModel(nn.Module):
    """A transformers model with a table of soft prompts, one row per task.

    Args:
        model: a transformers seq2seq LM (T5, mT5) or causal LM (GPT-2, Llama).
        prompts: the prompt table [T, P, d] (d = the model's embedding size), or None for no
            prompts (the wrapper then behaves as the bare model). Copied into an
            ``nn.Parameter``; its dtype is kept (a float32 table may train under a bf16 model).
        task_names: one name per table row (default ``task0``, ``task1``, ...).

    Raises:
        ValueError: the table is not 3-D, its last dimension is not the embedding size, or the
            names do not match its rows one to one.
    """

    def __init__(
        self, model: nn.Module, prompts: Tensor | None = None, task_names: list[str] | None = None
    ):
        super().__init__()
        self.model = model
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        embedding = model.get_input_embeddings()
        dim = embedding.weight.shape[-1]
        if prompts is None:
            num_tasks = 0
            self.register_parameter("prompts", None)
        else:
            if prompts.ndim != 3 or prompts.shape[-1] != dim:
                raise ValueError(
                    f"prompts must have shape [tasks, prompt_length, {dim}] for this model, "
                    f"got {list(prompts.shape)}"
                )
            num_tasks = prompts.shape[0]
            table = prompts.detach().clone().to(embedding.weight.device)
            self.prompts = nn.Parameter(table)
        if task_names is None:
            task_names = [f"task{i}" for i in range(num_tasks)]
        if len(task_names) != num_tasks:
            raise ValueError(f"{len(task_names)} task names for a table of {num_tasks} prompts")
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task names must be unique, got {task_names}")
        self.task_names = list(task_names)
        # Not a module or tensor attribute: the kept prefixes never enter the state dict.
        self._prefixes = _PrefixStore()

    @classmethod
    def from_bank(
        cls,
        model: nn.Module,
        bank,
        tasks: list[str],
        *,
        refs: Mapping[str, str] | None = None,
    ) -> PromptedModel:
        """Wrap ``model`` with the bank's prompts for ``tasks`` (row i = ``tasks[i]``).

        Args:
            model: the model the prompts are loaded for (the bank checks its fingerprint).
            bank: a :class:`~multipromot.bank.PromptBank` (anything with
                ``load_prompt(ref, model=...) -> Tensor [P, d]``).
            tasks: task names, in table order.
            refs: optional task -> bank reference (e.g. ``{"rte": "rte@v0002"}``) to pin a
                version; tasks not in it load their current prompt.

        Returns:
            The wrapper, with ``task_names == tasks``.

        Raises:
            ValueError: the prompts do not all have the same shape.
            BankError: from the bank, for a missing, corrupt or foreign entry.
        """
        refs = dict(refs or {})
        unknown = sorted(set(refs) - set(tasks))
        if unknown:
            raise ValueError(f"refs name tasks that are not loaded: {unknown}")
        loaded = [bank.load_prompt(refs.get(task, task), model=model) for task in tasks]
        shapes = {task: tuple(p.shape) for task, p in zip(tasks, loaded, strict=True)}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"bank prompts differ in shape and cannot share a table: {shapes}")
        prompts = torch.stack([p.float() for p in loaded]) if loaded else None
        return cls(model, prompts, list(tasks))

    @property
    def num_tasks(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[0]

    @property
    def prompt_length(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[1]

    def task_ids(self, names: Sequence[str | None]) -> Tensor:
        """Table rows for task names; None (no prompt) -> -1.

        Returns:
            LongTensor [len(names)] on the CPU (``forward`` moves it).

        Raises:
            ValueError: a name is not in ``task_names``.
        """
        index = {name: i for i, name in enumerate(self.task_names)}
        ids = []
        for name in names:
            if name is not None and name not in index:
                raise ValueError(f"unknown task {name!r}; the prompt table has {self.task_names}")
            ids.append(-1 if name is None else index[name])
        return torch.tensor(ids, dtype=torch.long)

    def set_trainable(self, what: str) -> None:
        """Choose what trains: ``"prompt"`` (stage 1), ``"model"`` (stage 2) or ``"both"`` (joint).

        Raises:
            ValueError: an unknown choice, or ``"prompt"``/``"both"`` without a prompt table.
        """
        if what not in TRAINABLE_MODES:
            raise ValueError(f"unknown trainable part {what!r}; choose one of {TRAINABLE_MODES}")
        if what != "model" and self.prompts is None:
            raise ValueError(f"{what!r} trains the prompts, but there is no prompt table")
        for param in self.model.parameters():
            param.requires_grad_(what != "prompt")
        if self.prompts is not None:
            self.prompts.requires_grad_(what != "model")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        **kwargs,
    ):
        """Run the model with each row's soft prompt prepended.

        Args:
            input_ids: [B, L]; decoder-only inputs must be left-padded.
            attention_mask: [B, L], 1 for real tokens.
            labels: seq2seq: the target ids [B, Lt] (the model builds its decoder inputs from
                them, as without a prompt); decoder-only: aligned with ``input_ids``, -100 where
                no loss is wanted. Prompt positions never carry a loss.
            task_ids: [B] table rows, -1 = no prompt; None = no prompt for any row.
            **kwargs: passed to the model (e.g. ``decoder_input_ids``, ``num_items_in_batch``).

        Returns:
            The model's output; ``logits`` are aligned with ``input_ids`` (decoder-only) or the
            labels / decoder inputs (seq2seq); ``loss`` is the mean token cross-entropy over
            labels != -100 when labels are given.

        Raises:
            ValueError: bad task ids or right-padded decoder-only inputs.
        """
        inputs, num_prompt, order = self._model_inputs(input_ids, attention_mask, task_ids)
        model_labels = labels
        if labels is not None and not self.is_encoder_decoder:
            model_labels = _with_prompt_labels(labels, num_prompt, order)
        out = self.model(**inputs, labels=model_labels, **kwargs)
        if num_prompt and not self.is_encoder_decoder:
            # Left padding keeps every text token exactly num_prompt positions to the right.
            out.logits = out.logits[:, num_prompt:]
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        task_ids: Tensor | None = None,
        *,
        prefix_cache: bool = False,
        **gen_kwargs,
    ):
        """Generate with each row's soft prompt, through ``inputs_embeds``.

        Stays a method of this module that calls ``self.model.generate`` so that FSDP2 can
        register it with ``register_fsdp_forward_method(wrapper, "generate")``.

        Args:
            input_ids: [B, L]; decoder-only inputs must be left-padded.
            attention_mask: [B, L].
            task_ids: [B] table rows, -1 = no prompt; None = no prompt for any row.
            prefix_cache: decoder-only: reuse each task's prompt keys/values (computed once
                per weights and prompt values) instead of running the P prompt positions
                again for every row. Needs eval mode (dropout would make the kept keys
                differ). Falls back to the prepend path for a sharded (FSDP) model or a
                model whose cache has no per-layer keys/values.
            **gen_kwargs: ``generate`` options (``max_new_tokens``, ``num_beams``, ...). Use
                ``max_new_tokens`` rather than ``max_length``: with ``inputs_embeds``,
                transformers reads ``max_length`` differently per family. Penalties that look
                at the input ids (``repetition_penalty``, ``no_repeat_ngram_size``) only see
                the generated tokens.

        Returns:
            The new tokens only, [B, N], for both families (the seq2seq decoder start token is
            dropped), padded with the pad id after a row's EOS. With
            ``return_dict_in_generate=True`` the output object with ``sequences`` trimmed alike.

        Raises:
            ValueError: bad task ids or right-padded decoder-only inputs; ``prefix_cache`` for
                a seq2seq model (its encoder attends both ways: no prompt-only prefix) or in
                training mode.
        """
        if prefix_cache:
            if self.is_encoder_decoder:
                raise ValueError(
                    "prefix_cache is for decoder-only models: a seq2seq encoder attends in both "
                    "directions, so the prompt's states depend on the text after it"
                )
            if self.training:
                raise ValueError("prefix_cache needs eval mode (dropout changes the prompt keys)")
        inputs = None
        if prefix_cache and _cacheable(self):
            inputs = self._cached_inputs(input_ids, attention_mask, task_ids, gen_kwargs)
        if inputs is None:
            inputs, _, _ = self._model_inputs(input_ids, attention_mask, task_ids)
            if _encode_in_groups(self, inputs, gen_kwargs):
                inputs = self._encoded_in_groups(inputs)
        out = self.model.generate(**inputs, **gen_kwargs)
        # Decoder-only generate from inputs_embeds alone already returns only the new tokens.
        start = 1 if self.is_encoder_decoder else 0
        if isinstance(out, Tensor):
            return out[:, start:]
        out.sequences = out.sequences[:, start:]
        return out

    def _cached_inputs(
        self, input_ids: Tensor, attention_mask: Tensor, task_ids: Tensor | None, gen_kwargs: dict
    ) -> dict | None:
        """``generate`` inputs with a ready cache of the prompts and the text; None = use the
        prepend path.

        Layout: the cache holds, per row, the P prompt positions (zeros, masked, for -1 rows),
        the text's left padding and every text token but the last; ``generate`` runs the last
        column for the whole batch and decodes. ``inputs_embeds`` covers the whole length as
        ``generate`` expects when a cache is passed; it only reads the uncached column.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = attention_mask.long()
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("decoder-only inputs must be left-padded (pad tokens first)")
        block = self._prompt_block(task_ids, input_ids.shape[0], embeds)
        if block is None:
            return None  # no prompted row: the plain path adds nothing anyway
        _, prompt_mask = block
        layers, cache_kwarg = self._prefixes.layers(self, task_ids.tolist(), embeds)
        if layers is None:
            return None
        mask = torch.cat([prompt_mask, mask], dim=1)
        # The prepend path's positions: counted over unmasked positions only.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        layers = _prefill_text(self.model, layers, embeds, mask, positions, cache_kwarg)
        from transformers import DynamicCache  # deferred: transformers is heavy to import

        # generate expands the batch's tensors (per beam in beam search, else per returned
        # sequence) but not a cache object: expand it here by the same rule.
        defaults = gen_kwargs.get("generation_config") or self.model.generation_config
        beams = int(gen_kwargs.get("num_beams", defaults.num_beams) or 1)
        copies = int(gen_kwargs.get("num_return_sequences", defaults.num_return_sequences) or 1)
        expand = beams if beams > 1 else copies
        data = [(k.repeat_interleave(expand, 0), v.repeat_interleave(expand, 0)) for k, v in layers]
        cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
        placeholder = embeds.new_zeros(embeds.shape[0], prompt_mask.shape[1], embeds.shape[-1])
        return {
            "inputs_embeds": torch.cat([placeholder, embeds], dim=1),
            "attention_mask": mask,
            "position_ids": positions,
            cache_kwarg: cache,
        }

    def _encoded_in_groups(self, inputs: dict[str, Tensor]) -> dict:
        """Seq2seq ``generate`` inputs with the encoder already run, a group of rows at a time.

        ``generate`` would run the encoder on the whole batch at once; on a CPU, a batch of 32
        rows of 150 positions makes activations that no longer fit the caches, and a row costs
        up to 1.5x what it costs in a group of 4 (benchmarks/RESULTS.md, section 12). Decoding
        still runs the whole batch, where large batches pay. Every group keeps the batch's
        padded length and rows never see each other, so the states are bit for bit those of
        the whole batch (tests/test_generation_groups.py).
        """
        from transformers.modeling_outputs import BaseModelOutput  # deferred: heavy import

        embeds, mask = inputs["inputs_embeds"], inputs["attention_mask"]
        rows = max(1, PREFILL_POSITIONS // embeds.shape[1])
        encoder = self.model.get_encoder()
        states = [
            encoder(inputs_embeds=embeds[i : i + rows], attention_mask=mask[i : i + rows])[0]
            for i in range(0, embeds.shape[0], rows)
        ]
        return {
            "encoder_outputs": BaseModelOutput(last_hidden_state=torch.cat(states)),
            "attention_mask": mask,
        }

    def _model_inputs(
        self, input_ids: Tensor, attention_mask: Tensor, task_ids: Tensor | None
    ) -> tuple[dict[str, Tensor], int, Tensor | None]:
        """The model's keyword inputs with the prompts placed.

        Returns:
            (inputs, number of prompt positions added, the decoder-only reordering or None).
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = attention_mask.long()
        if not self.is_encoder_decoder and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("decoder-only inputs must be left-padded (pad tokens first)")
        block = self._prompt_block(task_ids, input_ids.shape[0], embeds)
        order = None
        num_prompt = 0
        if block is not None:
            prompt_embeds, prompt_mask = block
            num_prompt = prompt_embeds.shape[1]
            embeds = torch.cat([prompt_embeds, embeds], dim=1)
            mask = torch.cat([prompt_mask, mask], dim=1)
            if not self.is_encoder_decoder:
                # [p][.][t] -> [.][p][t]: a stable sort on the mask moves every masked position
                # (left padding and -1 placeholders) to the front and keeps the rest in order.
                # With mask-counted positions both layouts give the same logits, but keeping
                # each row's real tokens contiguous and last is the left padding that
                # transformers assumes elsewhere (generation checks, attention unpadding).
                order = torch.argsort(mask, dim=1, stable=True)
                mask = mask.gather(1, order)
                embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
        inputs = {"inputs_embeds": embeds, "attention_mask": mask}
        if not self.is_encoder_decoder:
            # GPT-2 and Llama forward use arange positions when none are given, which would
            # count left padding and placeholders; count real positions only, as generate does.
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return inputs, num_prompt, order

    def _prompt_block(
        self, task_ids: Tensor | None, batch_size: int, embeds: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Each row's prompt embeddings [B, P, d] and mask [B, P]; None if no row has one."""
        if task_ids is None:
            return None
        if task_ids.shape != (batch_size,):
            raise ValueError(f"task_ids must have shape [{batch_size}], got {list(task_ids.shape)}")
        values = task_ids.tolist()
        bad = [t for t in values if t < -1 or t >= self.num_tasks]
        if bad:
            raise ValueError(
                f"task id {bad[0]} out of range: the prompt table has {self.num_tasks} rows "
                "(-1 = no prompt)"
            )
        if all(t == -1 for t in values):
            return None
        ids = task_ids.to(self.prompts.device)
        has_prompt = ids >= 0
        # A one-hot product, not self.prompts[ids]: the backward of advanced indexing
        # accumulates with multiple CPU threads in a varying order, and at stage 1's learning
        # rates that float noise made two identical runs end with different prompts (lab_rte
        # 100 vs 59 after 300 steps). A matmul's backward sums in a fixed order.
        pick = F.one_hot(ids.clamp(min=0), self.num_tasks).to(self.prompts.dtype)
        rows = torch.einsum("bt,tpd->bpd", pick, self.prompts)
        rows = rows.to(device=embeds.device, dtype=embeds.dtype)
        # -1 rows get zero placeholders (masked out below); torch.where sends them no gradient.
        rows = torch.where(
            has_prompt.to(embeds.device)[:, None, None], rows, torch.zeros_like(rows)
        )
        mask = has_prompt.to(embeds.device).long()[:, None].expand(-1, rows.shape[1])
        return rows, mask


def _cacheable(prompted: PromptedModel) -> bool:
    """False for a model sharded with FSDP2: its parameters are DTensors, unsharded per call."""
    return not any(hasattr(p, "_local_tensor") for p in prompted.parameters())


# Positions (rows x padded length) per encoder or prefill call on a CPU: one call's activations
# then stay in the caches (measured: benchmarks/RESULTS.md, sections 3 and 12).
PREFILL_POSITIONS = 1024


def _encode_in_groups(prompted: PromptedModel, inputs: dict, gen_kwargs: dict) -> bool:
    """Whether ``generate`` should get the seq2seq encoder states run a group of rows at a time:
    on a CPU, for a batch larger than a group, when the output asks for no encoder internals."""
    if not prompted.is_encoder_decoder or not _cacheable(prompted):
        return False
    embeds = inputs["inputs_embeds"]
    if embeds.device.type != "cpu" or embeds.shape[0] * embeds.shape[1] <= PREFILL_POSITIONS:
        return False
    config = gen_kwargs.get("generation_config") or prompted.model.generation_config
    internals = ("output_attentions", "output_hidden_states")
    return not any(gen_kwargs.get(k, getattr(config, k, False)) for k in internals)


def _row_groups(lengths: list[int], extra: int, budget: int | None) -> list[tuple[list[int], int]]:
    """Rows in groups of similar length, longest first: (row indices, the group's longest
    length), each group within ``budget`` positions (``extra`` per row counted too; None: one
    group)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if budget is None:
        return [(order, lengths[order[0]])] if order else []
    groups, start = [], 0
    while start < len(order):
        width = lengths[order[start]]
        count = max(1, budget // max(width + extra, 1))
        groups.append((order[start : start + count], width))
        start += count
    return groups


def _prefill_text(
    model: nn.Module,
    prefixes: list[tuple[Tensor, Tensor]],
    embeds: Tensor,
    mask: Tensor,
    positions: Tensor,
    cache_kwarg: str,
) -> list[tuple[Tensor, Tensor]]:
    """Per layer, keys and values [B, H, P + L - 1, hd]: each row's prompt prefix, then its
    text but the last token, left-padded to the batch's length as in the prepend layout.

    On a CPU the text runs in groups of rows of similar length (:func:`_row_groups`), each cut
    to its longest row: a mixed batch sorted by characters still pads 8 short rows to the 256
    tokens of the long rows beside them; here they cost their own length. The padded slots in front of
    a group's columns stay zero (masked). The values equal the whole batch's up to float
    summation order (the tests compare tokens, and scores to 1e-5).
    """
    from transformers import DynamicCache  # deferred: transformers is heavy to import

    batch, length = embeds.shape[:2]
    num_prompt = mask.shape[1] - length
    size = num_prompt + length - 1
    out = []
    for keys, values in prefixes:
        full_k = keys.new_zeros(batch, keys.shape[1], size, keys.shape[3])
        full_v = values.new_zeros(batch, values.shape[1], size, values.shape[3])
        full_k[:, :, :num_prompt] = keys
        full_v[:, :, :num_prompt] = values
        out.append((full_k, full_v))
    text = mask[:, num_prompt:].sum(dim=1).tolist()
    # On a GPU one call for the batch (cut to its longest row): launches cost more than padding.
    budget = PREFILL_POSITIONS if embeds.device.type == "cpu" else None
    for rows, width in _row_groups(text, num_prompt, budget):
        if width <= 1:
            continue  # nothing before the last token: generate runs it
        idx = torch.tensor(rows, device=embeds.device)
        cut = length - width  # left padding every row of the group has
        cache = DynamicCache(ddp_cache_data=[(k[idx], v[idx]) for k, v in prefixes])
        columns = torch.cat([mask[idx, :num_prompt], mask[idx, num_prompt + cut : -1]], dim=1)
        model.base_model(
            inputs_embeds=embeds[idx, cut:-1],
            attention_mask=columns,
            position_ids=positions[idx, num_prompt + cut : -1],
            use_cache=True,
            **{cache_kwarg: cache},
        )
        for (full_k, full_v), layer in zip(out, cache.layers, strict=True):
            full_k[idx, :, num_prompt + cut :] = layer.keys[:, :, num_prompt:]
            full_v[idx, :, num_prompt + cut :] = layer.values[:, :, num_prompt:]
    return out


class _PrefixStore:
    """The kept prompt prefixes of one PromptedModel: per task, each layer's keys and values.

    Valid while the model's weights (data pointer + in-place version of every parameter and
    buffer, dtype, device) are those they were computed with, and while each task's prompt row
    equals, by value, the row they were computed from (a write through ``.data`` skips the
    version counter, so prompts are compared by value: a [P, d] compare per task per call).
    """

    def __init__(self) -> None:
        self.weights_key: tuple | None = None
        self.rows: dict[int, Tensor] = {}  # task -> the prompt row its prefix was built from
        self.prefix: dict[int, list[tuple[Tensor, Tensor]]] = {}  # task -> [(keys, values)]
        self.cache_kwarg = "past_key_values"
        self.builds = 0  # prefix forward passes run (each covers every missing task at once)

    def layers(
        self, prompted: PromptedModel, task_ids: list[int], embeds: Tensor
    ) -> tuple[list[tuple[Tensor, Tensor]] | None, str]:
        """Per layer, keys and values [B, H, P, hd] for a batch's rows (zeros for -1 rows).

        Returns:
            (the layers, or None if the model's cache has no per-layer keys/values; the name
            of ``generate``'s cache argument).
        """
        model = prompted.model
        key = _weights_key(model)
        if key != self.weights_key:
            self.rows.clear()
            self.prefix.clear()
            self.weights_key = key
        table = prompted.prompts.detach()
        wanted = sorted({t for t in task_ids if t >= 0})
        stale = [t for t in wanted if t not in self.rows or not torch.equal(self.rows[t], table[t])]
        if stale and not self._build(model, table, stale, embeds):
            return None, self.cache_kwarg
        ref = self.prefix[wanted[0]]
        layers = []
        for index in range(len(ref)):
            keys, values = [], []
            for t in task_ids:
                # -1 rows: zeros of a prompted row's shape (masked out; any finite values do).
                k, v = self.prefix[t if t >= 0 else wanted[0]][index]
                keys.append(k if t >= 0 else torch.zeros_like(k))
                values.append(v if t >= 0 else torch.zeros_like(v))
            layers.append((torch.stack(keys), torch.stack(values)))
        return layers, self.cache_kwarg

    def _build(self, model: nn.Module, table: Tensor, tasks: list[int], embeds: Tensor) -> bool:
        """Run the prompts of ``tasks`` alone through the model (positions 0..P-1) and keep them."""
        rows = table[tasks].to(device=embeds.device, dtype=embeds.dtype)
        count, length = rows.shape[:2]
        mask = torch.ones(count, length, dtype=torch.long, device=embeds.device)
        positions = torch.arange(length, device=embeds.device).expand(count, length)
        out = model(inputs_embeds=rows, attention_mask=mask, position_ids=positions, use_cache=True)
        # transformers 5.x names the cache "cache" in newer releases, "past_key_values" before;
        # generate takes it under the same name.
        self.cache_kwarg = "cache" if "cache" in out else "past_key_values"
        cache = out[self.cache_kwarg]
        layers = getattr(cache, "layers", None)
        if not layers or not all(hasattr(layer, "keys") for layer in layers):
            return False
        self.builds += 1
        for i, task in enumerate(tasks):
            self.rows[task] = table[task].clone()
            self.prefix[task] = [(layer.keys[i], layer.values[i]) for layer in layers]
        return True


def _weights_key(model: nn.Module) -> tuple:
    """What identifies the current weights: every tensor's storage, in-place version, type."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def _with_prompt_labels(labels: Tensor, num_prompt: int, order: Tensor | None) -> Tensor:
    """Decoder-only labels in the model's layout: -100 over prompt positions and placeholders."""
    if num_prompt == 0:
        return labels
    pad = labels.new_full((labels.shape[0], num_prompt), IGNORE_INDEX)
    return torch.cat([pad, labels], dim=1).gather(1, order)


def init_prompts(
    model: nn.Module,
    tokenizer,
    num_tasks: int,
    prompt_length: int,
    method: str = "random",
    texts: Sequence[str] | None = None,
    seed: int = 0,
) -> Tensor:
    """Initial prompt table [num_tasks, prompt_length, d], float32 on the CPU.

    Methods:
        ``random``: uniform in [-a, a] with a = sqrt(3) * std(embedding table), so the prompt
            has the same spread as the model's token embeddings. Lester et al. (T5) use a fixed
            [-0.5, 0.5]; no fixed range fits every family (GPT-2 and Llama embedding entries
            are ~0.01-0.1, so 0.5 would drown the text), while matching the std does.
        ``vocab``: embeddings of token ids sampled (without replacement while there are
            enough) from the first 5,000 ids, or the whole vocabulary if smaller, special
            tokens excluded (Lester et al.'s "sampled vocab").
        ``text``: the embeddings of ``texts[t]`` (e.g. the task's class labels), tokenized
            without special tokens, cycled or truncated to ``prompt_length``.

    Args:
        model: the model whose input embeddings set d and the values.
        tokenizer: its tokenizer (``vocab`` and ``text``).
        num_tasks: rows of the table.
        prompt_length: P, positions per prompt.
        method: ``random``, ``vocab`` or ``text``.
        texts: one text per task, for ``text``.
        seed: the sampling seed (the global RNG is left alone).

    Returns:
        The table, float32 on the CPU.

    Raises:
        ValueError: an unknown method, a non-positive size, ``texts`` missing or not one per
            task, or a text with no tokens.
    """
    if num_tasks < 1 or prompt_length < 1:
        raise ValueError(
            f"num_tasks and prompt_length must be >= 1, got {num_tasks}, {prompt_length}"
        )
    weight = model.get_input_embeddings().weight.detach().float().cpu()
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        bound = 3**0.5 * weight.std().item()
        shape = (num_tasks, prompt_length, weight.shape[1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    if method == "vocab":
        ids = [
            _sample_vocab_ids(weight, tokenizer, prompt_length, generator) for _ in range(num_tasks)
        ]
        return weight[torch.stack(ids)]
    if method == "text":
        if texts is None or len(texts) != num_tasks:
            got = "none" if texts is None else len(texts)
            raise ValueError(f"method 'text' needs one text per task ({num_tasks}), got {got}")
        ids = [_cycled_text_ids(tokenizer, text, prompt_length) for text in texts]
        return weight[torch.stack(ids)]
    raise ValueError(f"unknown prompt init {method!r}; choose random, vocab or text")


def _sample_vocab_ids(weight: Tensor, tokenizer, count: int, generator: torch.Generator) -> Tensor:
    size = min(VOCAB_SAMPLE_SIZE, weight.shape[0], len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []))
    pool = torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)
    if count <= len(pool):
        return pool[torch.randperm(len(pool), generator=generator)[:count]]
    return pool[torch.randint(len(pool), (count,), generator=generator)]


def _cycled_text_ids(tokenizer, text: str, length: int) -> Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt init text {text!r} has no tokens")
    return torch.tensor(ids, dtype=torch.long).repeat(length // len(ids) + 1)[:length]
