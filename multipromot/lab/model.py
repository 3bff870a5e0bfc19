"""The lab model: a small T5 pretrained here on k-shot prompts of the lab families.

ProMoT is about keeping a model's in-context ability while fine-tuning, so the embedded demo
needs a model that has some. This module builds one on 2 CPU cores in minutes (STACK.md, "A lab
model with in-context ability"):

* a word-level sentencepiece (unigram) tokenizer over the rendered lab corpus, built from
  ``(piece, score)`` pairs so it needs neither protobuf nor a ``.model`` file; single characters
  are kept as low-score pieces so unseen text still tokenizes, and ``"\\n"`` is a token of its
  own so the exemplar separator stays visible;
* a T5 (d_model 128, 2+2 layers, 4 heads, d_ff 512; about 1M parameters);
* one explicit training loop over a mixture of every lab family except ``lab_rte`` (kept out so
  fine-tuning on it has something to learn), each row a k-shot prompt with k = 0..8 (weights
  .2/.2/.15/.1/.1/.08/.07/.05/.05) built by the framework's own exemplar and collator code, so
  the model sees prompts exactly as the evaluation renders them, and k-shot prompts at least
  as long as the evaluation's;
* Adafactor at a peak lr of 1e-2 *scaled by each weight's RMS* (T5's own recipe), with 100
  warmup steps and a cosine decay to 20%: fixed absolute steps of 1e-2 would be large next to
  the small initial weights.

Why the recipe is what it is, with the figures that decided it: docs/results/lab-notes.md.

:func:`ensure_lab_model` builds it once into a ``from_pretrained`` directory (with
``lab_pretrain.json``: the recipe, the wall time and the 1-shot scores it reached).

The decoder-only lab model (``lab-llama``, sizes ``llama-small`` / ``llama-micro``) is the same
recipe with a Llama (2 layers, d 128, tied embeddings) in place of the T5: same tokenizer,
families and k-shot rows, trained by AdamW with QA and summary rows upweighted
(``LAB_DECODER_RECIPE``); the collator concatenates input and target (left padding) and the
loss covers the target only. It goes through ``PromptedModel`` (without prompts) so positions
are counted over real tokens, as in every later stage. The T5 recipe and its cache key are
untouched: the family is part of the size name.

Why one module of this size: the lab model's tokenizer, recipe, pretraining loop, quick
evaluation and cache are one recipe; the cache key is the recipe, so they change together.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from multipromot.data.batches import group_by_length
from multipromot.data.collate import Collator
from multipromot.data.exemplars import build_item
from multipromot.data.metrics import postprocess, score
from multipromot.data.tasks import get_task
from multipromot.errors import UserError
from multipromot.eval.generation import predict
from multipromot.eval.suites import build_items
from multipromot.features import IGNORE_INDEX
from multipromot.fsio import write_json
from multipromot.lab.tasks import FAMILIES, PRETRAIN_FAMILIES, SPLITS
from multipromot.lab.world import get_world
from multipromot.models import LINEAGE_FILE, save_model
from multipromot.soft_prompt import PromptedModel
from multipromot.train.common import Throughput, build_optimizer, lr_schedule

__all__ = [
    "LAB_SIZES",
    "LAB_DECODER_SIZES",
    "LAB_DECODER_RECIPE",
    "LabConfig",
    "PRETRAIN_RECORD",
    "lab_tasks",
    "lab_corpus",
    "build_lab_tokenizer",
    "build_lab_model",
    "pretrain",
    "evaluate_lab_model",
    "train_lab_model",
    "ensure_lab_model",
    "read_pretrain_record",
]

PRETRAIN_RECORD = "lab_pretrain.json"
# What the lab builds beyond its recipe: the families' rules, the tokenizer corpus, the loop.
# Bump it with any change to those, so a model cached by an older version is rebuilt rather
# than reused for a world it was not trained on.
# 3: 0..8 exemplars per pretraining row (was 0..3). 4: the RTE-like rule's other-dimension half
# (RTE-like examples are in the tokenizer's corpus, so the vocabulary changes with the rule).
LAB_VERSION = 4

# Architecture per size. "small" is the demo's model; "micro" is for tests (seconds, not minutes).
LAB_SIZES: dict[str, dict[str, int]] = {
    "small": {
        "d_model": 128,
        "d_kv": 32,
        "d_ff": 512,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
    },
    "micro": {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 1,
        "num_decoder_layers": 1,
        "num_heads": 4,
    },
}
# The decoder-only lab model (``lab-llama``): Llama shapes per size. Two layers, not four: a
# decoder runs every layer over input + target, and four layers made a pretraining step much
# slower than the T5's (the timing trial: docs/results/lab-notes.md).
LAB_DECODER_SIZES: dict[str, dict[str, int]] = {
    "llama-small": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "llama-micro": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}

# Generation budget per family for the 1-shot check: labels are one or two tokens, sentences
# at most ~12 words.
_MAX_NEW_TOKENS = {
    "lab_qa": 6,
    "lab_sum": 16,
    "lab_trans_fr": 20,
    "lab_trans_de": 20,
    "lab_trans_ro": 20,
}
_LABEL_TOKENS = 4


@dataclass
class LabConfig:
    """The lab model's recipe; recorded in ``lab_pretrain.json`` next to the model.

    Attributes:
        seed: model init, batch order and the tasks' generator seed.
        size: a key of :data:`LAB_SIZES`.
        steps: optimizer steps.
        batch_size: rows per step.
        lr: Adafactor's fixed peak learning rate.
        warmup_steps: linear warmup.
        final_fraction: the cosine decay ends at this fraction of ``lr``.
        shot_weights: probability of k = 0, 1, 2, ... exemplars in a row.
        families: the lab tasks in the pretraining mixture (uniform over tasks).
        max_input_length, max_target_length: collator budgets (tokens).
        eval_examples: test items per family in the 1-shot check (0 skips it).
        device: where to train ("cpu", "cuda"); the model is saved and checked on the CPU.
        optimizer: ``adafactor`` (steps scaled by each weight's RMS, the T5's recipe) or
            ``adamw``; ``weight_decay`` applies to AdamW.
        family_weights: a family's share of the rows relative to the others (default 1 each:
            uniform).
    """

    seed: int = 0
    size: str = "small"
    steps: int = 2000
    batch_size: int = 48
    lr: float = 1e-2
    warmup_steps: int = 100
    final_fraction: float = 0.2
    shot_weights: tuple[float, ...] = (0.2, 0.2, 0.15, 0.1, 0.1, 0.08, 0.07, 0.05, 0.05)
    families: tuple[str, ...] = PRETRAIN_FAMILIES
    max_input_length: int = 512  # an 8-shot WiC-like row is up to ~390 tokens
    max_target_length: int = 32
    eval_examples: int = 100
    device: str = "cpu"
    optimizer: str = "adafactor"
    weight_decay: float = 0.0
    family_weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first bad field."""
        if self.size not in LAB_SIZES and self.size not in LAB_DECODER_SIZES:
            known = sorted(LAB_SIZES) + sorted(LAB_DECODER_SIZES)
            raise UserError(f"unknown lab model size {self.size!r}; known: {known}", key="size")
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if not self.lr > 0:
            raise UserError(f"must be > 0, got {self.lr}", key="lr")
        weights = np.asarray(self.shot_weights, dtype=float)
        if weights.ndim != 1 or len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise UserError(
                f"need non-negative weights, got {self.shot_weights}", key="shot_weights"
            )
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise UserError(f"unknown or no lab families: {unknown}", key="families")
        if self.optimizer not in ("adafactor", "adamw"):
            raise UserError(f"must be adafactor or adamw, got {self.optimizer!r}", key="optimizer")
        odd = {f: w for f, w in self.family_weights.items() if f not in self.families or w <= 0}
        if odd:
            raise UserError(
                f"need positive weights of listed families, got {odd}", key="family_weights"
            )


# ---------------------------------------------------------------------------------------- data
def lab_tasks(names: Sequence[str] = FAMILIES) -> list[Any]:
    """The catalogue Tasks of the lab families (``multipromot/lab/catalogue.yaml``)."""
    return [get_task(name) for name in names]


def lab_corpus(tasks: Sequence[Any], examples_per_split: int = 200) -> list[str]:
    """The tokenizer's corpus: rendered examples of ``tasks`` plus every word of the lab world.

    Rendering the first ``examples_per_split`` examples of each split brings in every word the
    templates add; the world's word lists (entities, attribute values, verbs, lexicons, ...)
    bring in every word any example can contain, so the vocabulary is complete without
    rendering all ~30,000 examples. RTE-like is included although pretraining leaves it out:
    the vocabulary is the tokenizer's, not the model's knowledge (mT5's covers RTE too).

    Args:
        tasks: Tasks (``.examples(split)``, ``.render``).
        examples_per_split: how many examples of each split to render.

    Returns:
        The texts.
    """
    texts: list[str] = []
    for task in tasks:
        for split in SPLITS:
            for example in task.examples(split)[:examples_per_split]:
                texts.extend(task.render(example))
    world = get_world()
    texts.append(" ".join(world.source_words))
    texts.extend(" ".join(lexicon.values()) for lexicon in world.lexicons.values())
    texts.append(" ".join([*world.positive, *world.negative, *world.neutral, *world.polysemes]))
    return texts


# ------------------------------------------------------------------------------------ tokenizer
# A whitespace-separated token splits into a leading word and trailing punctuation pieces:
# "zib." -> "▁zib" + "."; "Q:" -> "▁Q" + ":".
_PIECE = re.compile(r"\w+|[^\w\s]")
_SPECIALS = ("<pad>", "</s>", "<unk>")
_CHAR_SCORE = -30.0  # far below any word: whole words always win, characters only as fallback


def build_lab_tokenizer(texts: Iterable[str]):
    """A word-level unigram tokenizer (T5Tokenizer) over ``texts``.

    Every word of the corpus is one piece ``"▁word"`` scored by its log frequency; punctuation
    and every printable character are extra low-score pieces, so any ASCII text tokenizes
    (unknown words fall back to characters) and non-ASCII characters outside the corpus map to
    ``<unk>``. Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``"\\n"`` 3.

    Args:
        texts: the corpus (see :func:`lab_corpus`).

    Returns:
        A ``transformers.T5Tokenizer`` that round-trips through ``save_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AddedToken, T5Tokenizer

    words: Counter[str] = Counter()
    chars: set[str] = set(string.printable) - set(string.whitespace)
    for text in texts:
        for token in text.split():
            parts = _PIECE.findall(token)
            if not parts:
                continue
            words["▁" + parts[0]] += 1
            for part in parts[1:]:
                words[part] += 1
            chars.update(token)
    total = sum(words.values())
    vocab = [(s, 0.0) for s in _SPECIALS] + [("\n", 0.0)]
    # Most frequent first: ties broken by the piece itself, so the vocabulary is deterministic.
    for piece, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.append((piece, math.log(count / total)))
    known = {piece for piece, _ in vocab}
    for char in sorted(chars | {"▁"}):
        if char not in known:
            vocab.append((char, _CHAR_SCORE))
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    # The pre-tokenizer splits on whitespace and would drop newlines; an added token is matched
    # before that, so "\n\n" between exemplars stays two visible tokens.
    tokenizer.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tokenizer


# ---------------------------------------------------------------------------------------- model
def build_lab_model(tokenizer, size: str = "small", seed: int = 0):
    """A randomly initialised T5 (or, for a ``llama-*`` size, Llama) of the given size for
    ``tokenizer`` (dropout 0: the lab data is unlimited, and the stage configs set their own
    dropout)."""
    from transformers import T5Config, T5ForConditionalGeneration

    if size in LAB_DECODER_SIZES:
        return _build_lab_decoder(tokenizer, size, seed)
    if size not in LAB_SIZES:
        raise UserError(f"unknown lab model size {size!r}; known: {sorted(LAB_SIZES)}", key="size")
    config = T5Config(
        vocab_size=len(tokenizer),
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **LAB_SIZES[size],
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


# The decoder-only recipe's departures from LabConfig's defaults. Adafactor (the T5's recipe)
# left the 2-layer Llama far from converged (loss 0.45 after 1,500 steps, QA 19-26); AdamW's
# absolute steps converge, and upweighting the two families that copy spans or compress a
# passage (QA x3, summaries x2) brings them up with the rest. The trials, and each seed's 1-shot
# scores: docs/results/lab-notes.md and docs/results/decoder.md.
LAB_DECODER_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 0.01,
    "warmup_steps": 200,
    "final_fraction": 0.1,
    "family_weights": {"lab_qa": 3.0, "lab_sum": 2.0},
    "steps": 4500,
}


def _build_lab_decoder(tokenizer, size: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,  # as the T5's shared embeddings
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,  # the lab tokenizer has no BOS; none is added
        **LAB_DECODER_SIZES[size],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _is_decoder_only(model) -> bool:
    return not getattr(model.config, "is_encoder_decoder", False)


# ------------------------------------------------------------------------------------- training
class _Rendered:
    """A task whose ``render`` remembers each example's rendering (jinja costs more than the
    model at this size, so nothing is rendered twice); the item builder takes it as the task.

    The lab's examples are plain lists kept alive by the task, so an example's ``id`` is a
    stable key for as long as this object lives.
    """

    def __init__(self, task: Any):
        self.task = task
        self.name = task.name
        self._cache: dict[int, tuple[str, str]] = {}

    def examples(self, split: str) -> Sequence[dict]:
        return self.task.examples(split)

    def reference_list(self, example: dict) -> list[str]:
        return self.task.reference_list(example)

    def render(self, example: dict) -> tuple[str, str]:
        key = id(example)
        if key not in self._cache:
            self._cache[key] = self.task.render(example)
        return self._cache[key]


def _kshot_items(
    tasks: Sequence[Any],
    rendered: list[_Rendered],
    rng: np.random.Generator,
    count: int,
    shot_weights: np.ndarray,
    task_weights: np.ndarray | None = None,
) -> list[Any]:
    """``count`` random k-shot training rows: task uniform (or by ``task_weights``), example
    uniform, k by weight.

    Rows come from the framework's one item builder (same task, train split, never the row
    itself) with a fresh exemplar seed per row, so one example is shown with many different
    exemplar sets over the run.
    """
    items = []
    for _ in range(count):
        # uniform draws as the T5's recipe was built with (the same stream of draws)
        t = int(
            rng.integers(len(tasks))
            if task_weights is None
            else rng.choice(len(tasks), p=task_weights)
        )
        index = int(rng.integers(len(rendered[t].examples("train"))))
        k = int(rng.choice(len(shot_weights), p=shot_weights))
        seed = int(rng.integers(2**31))
        items.append(build_item(rendered[t], index, split="train", shots=k, seed=seed))
    return items


def _batch_stream(
    tasks: Sequence[Any],
    rendered: list[_Rendered],
    rng: np.random.Generator,
    batch_size: int,
    shot_weights: np.ndarray,
    task_weights: Sequence[float] | None = None,
    window: int = 16,
) -> Iterator[list[Any]]:
    """Endless batches of k-shot rows, grouped by length ``window`` batches at a time.

    k = 0..8 makes row lengths vary up to ten-fold; padding every row to the longest of a random
    batch would double the cost, so rows of similar length share a batch
    (:func:`~multipromot.data.collate.group_by_length`) and the batches of a window go out in random
    order.
    """
    shares = None
    if task_weights is not None and len(set(task_weights)) > 1:
        shares = np.asarray(task_weights, dtype=float) / sum(task_weights)
    while True:
        items = _kshot_items(tasks, rendered, rng, window * batch_size, shot_weights, shares)
        grouped = group_by_length(items, batch_size, window=window * batch_size)
        for i in rng.permutation(len(grouped)):
            yield grouped[i]


def pretrain(
    model,
    tokenizer,
    tasks: Sequence[Any],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    final_fraction: float,
    shot_weights: Sequence[float],
    seed: int,
    max_input_length: int,
    max_target_length: int,
    device: str | torch.device | None = None,
    progress: bool = True,
    optimizer: str = "adafactor",
    weight_decay: float = 0.0,
    task_weights: Sequence[float] | None = None,
) -> list[float]:
    """The lab pretraining loop: k-shot rows of ``tasks``, Adafactor (or AdamW), warmup +
    cosine.

    Args:
        model: a T5 or a decoder-only model (trained in place).
        tokenizer: its tokenizer.
        tasks: Tasks (``.examples("train")``, ``.render``) to mix uniformly.
        steps, batch_size, lr, warmup_steps, final_fraction: the optimisation recipe.
        shot_weights: probability of k = 0, 1, 2, ... exemplars.
        seed: batch order and exemplar choice.
        max_input_length, max_target_length: collator budgets.
        device: where to train (default: where the model is); the model stays there.
        progress: show a tqdm bar with the loss and tokens/s.
        optimizer, weight_decay: ``adafactor`` (RMS-scaled steps) or ``adamw``.
        task_weights: each task's relative share of the rows (None: uniform).

    Returns:
        The loss of every step.
    """
    rng = np.random.default_rng([seed, 0x1AB])
    weights = np.asarray(shot_weights, dtype=float)
    weights = weights / weights.sum()
    rendered = [_Rendered(task) for task in tasks]
    decoder_only = _is_decoder_only(model)
    collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=max_input_length,
        max_target_length=max_target_length,
    )
    # Decoder-only: through PromptedModel (no prompts), which counts positions over real tokens
    # as generation and the stages do; left padding would otherwise shift every position.
    forward = PromptedModel(model, None) if decoder_only else model
    if optimizer == "adafactor":
        optim = build_optimizer(model.parameters(), "adafactor", lr, scale_parameter=True)
    else:
        optim = build_optimizer(model.parameters(), optimizer, lr, weight_decay)
    scheduler = lr_schedule(
        optim,
        warmup_steps=warmup_steps,
        total_steps=steps,
        decay="cosine",
        final_fraction=final_fraction,
    )
    throughput = Throughput()
    losses: list[float] = []
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.to(device)
    model.train()
    stream = _batch_stream(tasks, rendered, rng, batch_size, weights, task_weights)
    bar = tqdm(range(steps), desc="lab pretrain", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = {k: v.to(device) for k, v in collator(next(stream)).items()}
        out = forward(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        optim.step()
        scheduler.step()
        optim.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())
        rate = throughput.update(tokens)
        if step % 10 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            bar.set_postfix(loss=f"{recent:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
    model.eval()
    return losses


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_lab_model(
    model,
    tokenizer,
    tasks: Sequence[Any],
    *,
    shots: int = 1,
    examples: int = 100,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 50,
    max_input_length: int = LabConfig.max_input_length,
) -> dict[str, float]:
    """Quick k-shot scores: greedy generation on the first ``examples`` items of each task.

    Each item gets ``shots`` exemplars from the task's train split
    (:func:`~multipromot.data.exemplars.choose_exemplars` with ``seed``); outputs are post-processed by
    the task's rule and scored by its metric (:func:`multipromot.data.metrics.score`), 0-100.

    Args:
        model: a seq2seq or decoder-only model.
        tokenizer: its tokenizer.
        tasks: catalogue Tasks (``.name``, ``.metric``, ``.postprocess``, ``.examples``).
        shots: exemplars per item.
        examples: items per task (fewer if the split is smaller).
        split: the split to score.
        seed: exemplar seed.
        batch_size: rows per generate call.
        max_input_length: the collator's input budget (tokens); default: the recipe's.

    Returns:
        ``{task name: score}``.
    """
    collator = Collator(
        tokenizer,
        decoder_only=_is_decoder_only(model),
        max_input_length=max_input_length,
        for_generation=True,
    )
    bare = PromptedModel(model, None)  # no prompt rows: the framework's one generation path
    scores: dict[str, float] = {}
    for task in tasks:
        # The evaluation suites' own k-shot items, so these scores match `multipromot eval`'s.
        items = build_items(task, shots, examples=examples, split=split, seed=seed)
        outputs = predict(
            bare,
            tokenizer,
            items,
            collator,
            batch_size=batch_size,
            max_new_tokens=_MAX_NEW_TOKENS.get(task.name, _LABEL_TOKENS),
        )
        predictions = [postprocess(o, task.postprocess) for o in outputs]
        scores[task.name] = round(score(task.metric, predictions, [i.gold for i in items]), 2)
    return scores


# ------------------------------------------------------------------------------------- building
def train_lab_model(config: LabConfig, *, progress: bool = True) -> tuple[Any, Any, dict]:
    """Build the tokenizer and the model and pretrain them (no evaluation).

    Args:
        config: the recipe.
        progress: show a progress bar.

    Returns:
        ``(model, tokenizer, record)``: the model on the CPU in eval mode, and the record that
        :func:`ensure_lab_model` writes (recipe, size, losses, times).
    """
    config.validate()
    start, cpu_start = time.perf_counter(), time.process_time()
    tasks = lab_tasks(FAMILIES)
    tokenizer = build_lab_tokenizer(lab_corpus(tasks))
    model = build_lab_model(tokenizer, config.size, config.seed)
    losses = pretrain(
        model,
        tokenizer,
        [t for t in tasks if t.name in config.families],
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        final_fraction=config.final_fraction,
        shot_weights=config.shot_weights,
        seed=config.seed,
        max_input_length=config.max_input_length,
        max_target_length=config.max_target_length,
        device=config.device,
        progress=progress,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        task_weights=[config.family_weights.get(f, 1.0) for f in config.families],
    )
    model.cpu()
    tail = max(1, len(losses) // 20)
    record = {
        "lab_version": LAB_VERSION,
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "loss_first": sum(losses[:tail]) / tail,
        "loss_last": sum(losses[-tail:]) / tail,
        "train_seconds": round(time.perf_counter() - start, 1),
        # CPU time of all threads: on a shared machine it tells what the wall time would be on
        # idle cores (about cpu seconds / threads), which the wall time alone does not.
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "torch_threads": torch.get_num_threads(),
        "unseen_in_pretraining": [t.name for t in tasks if t.name not in config.families],
    }
    return model, tokenizer, record


def read_pretrain_record(model_dir: str | os.PathLike) -> dict:
    """The ``lab_pretrain.json`` of a lab model directory ({} if there is none)."""
    path = Path(model_dir) / PRETRAIN_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_lab_model(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    steps: int | None = None,
    size: str = "small",
    rebuild: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """The lab model directory at ``path``: built and saved once, then reused while its recorded
    recipe and :data:`LAB_VERSION` match the ones asked for (otherwise built again).

    A file lock next to ``path`` makes concurrent callers (several ranks, two demos) wait for
    one build instead of racing.

    Args:
        path: the model directory (``from_pretrained`` loads it).
        seed: model init, batch order and the tasks' seed.
        steps: optimizer steps (default: :class:`LabConfig`'s).
        size: a key of :data:`LAB_SIZES` (``micro`` for tests) or of
            :data:`LAB_DECODER_SIZES` (the decoder-only lab model).
        rebuild: build even if ``path`` already holds a model (it is replaced atomically).
        progress: show progress.
        **overrides: any other :class:`LabConfig` field (``batch_size``, ``lr``, ...).

    Returns:
        ``path`` as a Path, holding weights, tokenizer, ``multipromot.json`` and
        ``lab_pretrain.json``.

    Raises:
        UserError: an unknown or bad recipe field.
    """
    path = Path(path)
    known = set(LabConfig.__dataclass_fields__) - {"seed", "size", "steps"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown lab recipe field(s): {', '.join(unknown)}", key=unknown[0])
    config = LabConfig(seed=seed, size=size, **overrides)
    if steps is not None:
        config.steps = steps

    def built() -> bool:
        """``path`` holds a model of this recipe and this lab version."""
        record = read_pretrain_record(path)
        return (
            (path / LINEAGE_FILE).is_file()
            and record.get("lab_version") == LAB_VERSION
            and _recipe(record.get("config", {})) == _recipe(asdict(config))
        )

    if not rebuild and built():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not rebuild and built():  # built while we waited
            return path
        model, tokenizer, record = train_lab_model(config, progress=progress)
        name = "lab-llama" if size in LAB_DECODER_SIZES else "lab"
        record["fingerprint"] = save_model(model, tokenizer, path, name=name)
        # Written before the check too, so a failing check never costs the training.
        _write_record(path, record)
        if config.eval_examples > 0:
            start = time.perf_counter()
            record["one_shot_test_scores"] = evaluate_lab_model(
                model,
                tokenizer,
                lab_tasks(FAMILIES),
                shots=1,
                examples=config.eval_examples,
                seed=config.seed,
                max_input_length=config.max_input_length,
            )
            record["eval_seconds"] = round(time.perf_counter() - start, 1)
            _write_record(path, record)
    return path


def _recipe(config: dict) -> dict:
    """The fields of a :class:`LabConfig` that change the model (as JSON would store them); a
    record written before a field existed holds its default."""
    fields = {**asdict(LabConfig()), **config}
    fields = {k: v for k, v in fields.items() if k not in ("eval_examples", "device")}
    return json.loads(json.dumps(fields))


def _write_record(path: Path, record: dict) -> None:
    write_json(path / PRETRAIN_RECORD, record, indent=2)
