"""``MultiPromotLM``: lm-eval's ``LM`` interface over a :class:`PromptedModel`, each request
routed to its bank prompt or none.

Model arguments (``--model_args key=value,...``)::

    pretrained=RUN/final   any model spec models.load_model accepts (a stage-2 final/, a base
                           model directory, a built-in name such as tiny-t5, a hub id)
    bank=DIR               the prompt bank; a stage-2 model's stage2.json names its own bank
                           and versions, which win (experiment.prompt_refs)
    router=true|false      route each request's context to a bank prompt or none
    task=NAME              give every request NAME's prompt (overrides router)
    batch_size=N           rows per forward / generate call (default 32; "auto" = 32)
    max_length=N           token budget of a context (default 512, as `multipromot eval`)
    device=cpu|cuda:0      where the model runs (default: cuda if available)

How a request becomes tokens: a context is read in multipromot's k-shot layout, pieces joined
by ``features.SEPARATOR`` ("\\n\\n", lm-eval's default few-shot delimiter): the pieces before the
last are exemplars, the last is the input, and :class:`~multipromot.data.collate.Collator` (the
one tokenizer step) turns them into ids. So a context equal to a `multipromot eval` k-shot
prompt gets the same tokens, and an over-long context loses whole exemplars first. The router
sees the context string itself (``features.kshot_text`` of that item).

Scoring follows lm-eval's contract (as its ``HFLM``): trailing whitespace of a context moves to
the continuation, the continuation's ids are the ids of ``context + continuation`` after the
context's, an empty context is conditioned on the EOS token (BOS where the tokenizer adds one),
long inputs are cut from the left. Seq2seq models read the context in the encoder (as
generation does: ``B input eos``) and score the continuation in the decoder, without eos.
Prompt positions are never scored: :class:`PromptedModel` strips them from the logits.
Generation is :func:`multipromot.eval.generation.predict` (greedy, stops at EOS), then cut at
the first ``until`` string.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from multipromot.data.collate import Collator
from multipromot.data.tasks import get_task, list_tasks, local_tasks
from multipromot.errors import UserError
from multipromot.eval.generation import predict
from multipromot.features import IGNORE_INDEX, SEPARATOR, Item
from multipromot.models import is_encoder_decoder, load_model
from multipromot.router import calibrated_router, router_entries
from multipromot.soft_prompt import PromptedModel
from multipromot.trained import model_prompts, prompt_table

__all__ = ["MultiPromotLM"]

ARGS = "--model_args"  # where errors about constructor arguments point
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task sets no max_gen_toks
# Tokenize whole contexts and continuations without the collator cutting them: the budget is
# applied afterwards, from the left, as lm-eval scores.
NO_LIMIT = 1 << 30


@register_model("multipromot")
class MultiPromotLM(LM):
    """A ProMoT model for lm-eval; see the module docstring for the arguments.

    Raises:
        UserError: an unknown forced task, router or task without prompts, a bad batch size.
    """

    def __init__(
        self,
        pretrained: str,
        bank: str = "",
        router: bool = False,
        task: str = "",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int = 512,
        device: str = "",
        seed: int = 0,
        max_batch_size: int | None = None,  # lm-eval passes it; batches here are fixed-size
    ):
        super().__init__()
        model, tokenizer, path = load_model(str(pretrained), seed=seed)
        self._device = _device(device)
        model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.decoder_only = not is_encoder_decoder(model)
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length)
        self.prompted, self.bank, refs = _prompted(model, Path(path), str(bank or ""))
        self.task_names = list(self.prompted.task_names)
        self.forced = str(task) if task else None
        if self.forced is not None and self.forced not in self.task_names:
            raise UserError(
                f"task {self.forced!r} has no prompt here; the prompts are "
                f"{self.task_names or 'none'}",
                key=f"{ARGS} task",
            )
        self.router = None
        if router and self.forced is None:
            if not self.task_names:
                raise UserError("router=true needs prompts: give bank=DIR", key=f"{ARGS} router")
            # As `multipromot route`: bank tasks without a signature get a similarity fallback
            # calibrated on their own inputs against every local task of another format.
            known = [get_task(name) for name in self.task_names if name in list_tasks()]
            others = local_tasks(exclude=self.task_names)
            self.router = calibrated_router(
                router_entries(self.bank, refs), known, negatives=others, seed=seed
            )
        self.collator = Collator(
            tokenizer,
            decoder_only=self.decoder_only,
            max_input_length=NO_LIMIT,
            for_generation=True,
        )
        self.gen_collator = Collator(
            tokenizer,
            decoder_only=self.decoder_only,
            max_input_length=self.max_length,
            for_generation=True,
        )

    # ------------------------------------------------------------------------------------
    # Routing

    def route(self, contexts: Sequence[str]) -> list[str | None]:
        """The bank task whose prompt each context gets (None = no prompt)."""
        if self.forced is not None:
            return [self.forced] * len(contexts)
        if self.router is None:
            return [None] * len(contexts)
        return [r.task for r in self.router.route(list(contexts))]

    def _rows(self, contexts: Sequence[str]) -> list[int]:
        index = {name: i for i, name in enumerate(self.task_names)}
        return [-1 if name is None else index[name] for name in self.route(contexts)]

    # ------------------------------------------------------------------------------------
    # lm-eval's three request types

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation per request, cut at the first of its ``until`` strings."""
        contexts = [req.args[0] for req in requests]
        rows = self._rows(contexts)
        budgets: dict[int, list[int]] = {}  # max_gen_toks -> request indices (one predict each)
        stops: list[list[str]] = []
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise UserError(
                    "multipromot generates greedily: set do_sample false and temperature 0",
                    key="generation_kwargs",
                )
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else [s for s in until if s])
            budget = int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
            budgets.setdefault(budget, []).append(i)
        outputs = [""] * len(requests)
        for budget, indices in budgets.items():
            items = [_item(contexts[i], rows[i]) for i in indices]
            texts = predict(
                self.prompted,
                self.tokenizer,
                items,
                self.gen_collator,
                batch_size=self.batch_size,
                max_new_tokens=budget,
            )
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = _cut(text, stops[i])
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probs given the context, and whether greedy
        decoding would produce it."""
        pairs = [req.args for req in requests]
        rows = self._rows([context for context, _ in pairs])
        encoded = [self._encode_pair(context, continuation) for context, continuation in pairs]
        return self._score(encoded, rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-probability, in disjoint windows of ``max_length`` tokens."""
        texts = [req.args[0] for req in requests]
        rows = self._rows(texts)
        start = self.collator.prefix[0] if self.collator.prefix else self.collator.eos_id
        windows, owners, window_rows = [], [], []
        for i, text in enumerate(texts):
            for pair in get_rolling_token_windows(
                token_list=self._text_ids(text),
                prefix_token=start,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(pair))
                owners.append(i)
                window_rows.append(rows[i])
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self._score(windows, window_rows), strict=True):
            totals[owner] += logprob
        return totals

    # ------------------------------------------------------------------------------------
    # Tokens (through the Collator) and scores

    def _ids(self, items: list[Item]) -> list[list[int]]:
        """Each item's unpadded input ids as the collator builds them."""
        batch = self.collator(items)
        return [
            ids[mask.bool()].tolist()
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def _text_ids(self, text: str) -> list[int]:
        """A text's own ids: the collator's, without its leading special ids or closing eos."""
        ids = self._ids([_item(text, -1)])[0][len(self.collator.prefix) :]
        return ids if self.decoder_only else ids[:-1]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the model reads and scores them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not self.decoder_only:  # encoder input as generation builds it; decoder scores
            return self._ids([_item(context, -1)])[0], self._text_ids(continuation)
        ctx, whole = self._ids([_item(context, -1), _item(context + continuation, -1)])
        if not ctx:  # nothing to condition on and no BOS: condition on EOS, as lm-eval does
            return [self.collator.eos_id], whole
        return whole[: len(ctx)], whole[len(ctx) :]

    @torch.no_grad()
    def _score(
        self, encoded: list[tuple[list[int], list[int]]], rows: list[int]
    ) -> list[tuple[float, bool]]:
        """Log-prob sum and greediness of each continuation, batched by length."""
        for _, cont in encoded:
            if len(cont) > self.max_length:
                raise UserError(
                    f"a continuation of {len(cont)} tokens is longer than "
                    f"max_length={self.max_length}",
                    key=f"{ARGS} max_length",
                )
        # an empty continuation has log-prob 0 and is trivially greedy: no forward needed
        scored = [i for i in range(len(encoded)) if encoded[i][1]]
        order = sorted(scored, key=lambda i: -sum(map(len, encoded[i])))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            pairs = [encoded[i] for i in chunk]
            task_ids = torch.tensor([rows[i] for i in chunk], device=self._device)
            if self.decoder_only:
                logits, targets = self._causal_logits(pairs, task_ids)
            else:
                logits, targets = self._seq2seq_logits(pairs, task_ids)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for b, i in enumerate(chunk):
                n = len(encoded[i][1])
                lp, tgt = logprobs[b, -n:] if self.decoder_only else logprobs[b, :n], targets[b]
                picked = lp.gather(-1, tgt[:, None]).squeeze(-1)
                greedy = bool((lp.argmax(-1) == tgt).all())
                results[i] = (float(picked.sum()), greedy)
        return results

    def _causal_logits(self, pairs, task_ids):
        """Left-padded ``(context + continuation)[:-1]``, cut from the left to ``max_length``;
        the last len(continuation) logits predict the continuation."""
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        width = max(map(len, inputs))
        pad = self.collator.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in inputs], device=self._device)
        mask = torch.tensor(
            [[0] * (width - len(r)) + [1] * len(r) for r in inputs], device=self._device
        )
        logits = self.prompted(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
        targets = [torch.tensor(cont, device=self._device) for _, cont in pairs]
        return logits, targets

    def _seq2seq_logits(self, pairs, task_ids):
        """Encoder: the context (cut from the left); decoder: the continuation as labels."""
        inputs = [ctx[-self.max_length :] for ctx, _ in pairs]
        width = max(map(len, inputs))
        twidth = max(len(cont) for _, cont in pairs)
        pad = self.collator.pad_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in inputs], device=self._device)
        mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in inputs], device=self._device
        )
        labels = torch.tensor(
            [c + [IGNORE_INDEX] * (twidth - len(c)) for _, c in pairs], device=self._device
        )
        out = self.prompted(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
        targets = [torch.tensor(cont, device=self._device) for _, cont in pairs]
        return out.logits, targets

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)


def _device(name: str) -> torch.device:
    """The device asked for; lm-eval's command line asks for cuda by default, so a machine
    without CUDA runs on the CPU (said on stderr) instead of failing."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        print(f"multipromot: device {name!r} is not available here; using the CPU", file=sys.stderr)
        return torch.device("cpu")
    return torch.device(name)


def _batch_size(value: int | str) -> int:
    if str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise UserError(
            f"must be a positive integer or auto, got {value!r}", key=f"{ARGS} batch_size"
        )
    return size


def _item(context: str, row: int) -> Item:
    """A context in multipromot's k-shot layout: exemplars, then the input (no target)."""
    *exemplars, text = context.split(SEPARATOR)
    return Item(task_id=row, input=text, target="", exemplars=exemplars)


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end]


def _prompted(model, model_dir: Path, bank_dir: str) -> tuple[PromptedModel, object, dict]:
    """The model with its prompt table: the bank and versions stage 2 trained with when its
    ``stage2.json`` records them (as ``multipromot eval`` reads a stage-2 model), else the
    current entry of every task of ``bank_dir`` that this model accepts
    (:func:`multipromot.trained.model_prompts`).

    Returns:
        (the wrapper, the PromptBank or None, task -> ref).
    """
    store, refs, _ = model_prompts(model, model_dir, bank_dir or None, key=f"{ARGS} bank")
    if store is None:
        return PromptedModel(model), None, {}
    return prompt_table(model, store, list(refs), refs), store, refs
