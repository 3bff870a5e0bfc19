"""LoRA adapters (peft) for the methods ``lora`` and ``promot_lora``.

- ``lora``: one adapter trained on the stage-2 mixture while the model stays frozen
  (``stage2.mode=lora``); it is active on every row. ``final/`` holds the merged weights
  (``from_pretrained`` gives the LoRA-fine-tuned model) and ``final/adapters/`` the adapter in
  peft's format (``PeftModel.from_pretrained(base, final/adapters)``).
- ``promot_lora`` (the paper's Table 11): stage 1 trains one adapter per task instead of a soft
  prompt (:mod:`multipromot.train.stage1_lora`); stage 2 fine-tunes the model while each row's
  task adapter is frozen and active (``stage2.mode=promot_lora``). ``final/`` holds the
  fine-tuned weights without any adapter and ``final/adapters/<adapter>/`` the task adapters,
  unchanged, in peft's format (one folder per task; :func:`adapter_name`).

:class:`AdaptedModel` has the interface of :class:`~multipromot.soft_prompt.PromptedModel`
(``forward`` and ``generate`` with per-row ``task_ids``, -1 = no adapter), so stage 2, the
validation and the evaluation suites run it unchanged. peft runs rows of different adapters in
one forward only in eval mode (its mixed-adapter batches); a training batch that mixes tasks is
run task by task, and its loss is the token mean over the whole batch, as one forward gives.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from multipromot.config import LoraConfig
from multipromot.errors import UserError
from multipromot.features import IGNORE_INDEX
from multipromot.models import is_encoder_decoder, save_model

__all__ = [
    "ADAPTERS_DIR",
    "AdaptedModel",
    "adapter_name",
    "settings",
    "attach",
    "check_targets",
    "load_adapters",
    "save_adapters",
    "export",
]

# Inside a stage-2 model directory of a LoRA method: its adapters in peft's format.
ADAPTERS_DIR = "adapters"
# lora's one adapter: peft's default name, which peft saves at the folder's root.
SHARED = "default"
# peft's name for "no adapter" in a mixed-adapter batch.
BASE = "__base__"


def adapter_name(task: str) -> str:
    """The adapter (and folder) name of a task: peft keeps adapters in module dicts, whose keys
    cannot hold a dot (task names may)."""
    return task.replace(".", "_")


def settings(lora: LoraConfig) -> dict:
    """The ``lora.*`` keys that shape an adapter, for the records that decide reuse and resume
    (``lora.adapters`` only says where promot_lora's stage 2 finds its stage-1 adapters)."""
    return {k: v for k, v in asdict(lora).items() if k != "adapters"}


def peft_config(lora: LoraConfig, model: nn.Module) -> PeftLoraConfig:
    """peft's LoraConfig from the ``lora.*`` keys (target modules: peft's default for the
    architecture when the list is empty)."""
    task_type = TaskType.SEQ_2_SEQ_LM if is_encoder_decoder(model) else TaskType.CAUSAL_LM
    return PeftLoraConfig(
        task_type=task_type,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or None,
    )


class AdaptedModel(nn.Module):
    """A peft model whose rows pick their adapter by ``task_ids``, like PromptedModel's prompts.

    Args:
        peft_model: the model with its LoRA adapters.
        task_names: one task per adapter (row ``t`` uses ``adapter_name(task_names[t])``, -1
            none); None: one shared adapter, active on every row whatever its task id.
    """

    def __init__(self, peft_model: PeftModel, task_names: list[str] | None = None):
        super().__init__()
        self.model = peft_model
        self.is_encoder_decoder = is_encoder_decoder(peft_model.get_base_model())
        self.task_names = list(task_names or [])
        self._adapters_train = False

    def set_trainable(self, what: str) -> None:
        """``adapters``: only the adapter of each batch's task trains (stage 1, lora);
        ``model``: only the model's own weights train, the adapters stay frozen."""
        if what not in ("adapters", "model"):
            raise ValueError(f"unknown trainable part {what!r}; use adapters or model")
        self._adapters_train = what == "adapters"
        prefix = self.model.base_model.prefix  # "lora_": peft's parameter names
        for name, param in self.model.named_parameters():
            param.requires_grad_((prefix in name) == self._adapters_train)

    def _names(self, task_ids: Tensor | None, rows: int) -> list[str]:
        if not self.task_names:
            return [SHARED] * rows
        if task_ids is None:
            return [BASE] * rows
        return [BASE if t < 0 else adapter_name(self.task_names[t]) for t in task_ids.tolist()]

    @contextlib.contextmanager
    def _active(self, name: str):
        """Train with one adapter active (or none); a trained adapter is the only one with
        gradients, a frozen one gets none (peft's ``inference_mode``)."""
        if name == BASE:
            with self.model.disable_adapter():
                yield
            if not self._adapters_train:  # leaving it makes peft's active adapter trainable
                self.set_trainable("model")
            return
        self.model.set_adapter(name, inference_mode=not self._adapters_train)
        yield

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        **kwargs,
    ):
        """PromptedModel.forward with adapters instead of prompts (same arguments and logits)."""
        names = self._names(task_ids, input_ids.shape[0])
        if not self.training:
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                adapter_names=names,
                **kwargs,
            )
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:
            with self._active(names[0]):
                return self.model(
                    input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
                )
        outputs, order, loss_sum, count = [], [], 0.0, 0
        for name, rows in groups.items():
            index = torch.tensor(rows, device=input_ids.device)
            sub = {
                k: v[index] if isinstance(v, Tensor) and v.shape[:1] == input_ids.shape[:1] else v
                for k, v in kwargs.items()
            }
            sub_labels = None if labels is None else labels[index]
            with self._active(name):
                out = self.model(
                    input_ids=input_ids[index],
                    attention_mask=attention_mask[index],
                    labels=sub_labels,
                    **sub,
                )
            if sub_labels is not None:
                # the model's mean over its target tokens -> the whole batch's token mean
                scored = sub_labels if self.is_encoder_decoder else sub_labels[:, 1:]
                n = int(scored.ne(IGNORE_INDEX).sum())
                loss_sum, count = loss_sum + out.loss * n, count + n
            outputs.append(out)
            order += rows
        first = outputs[0]
        inverse = torch.argsort(torch.tensor(order, device=input_ids.device))
        first.logits = torch.cat([o.logits for o in outputs])[inverse]
        if labels is not None:
            first.loss = loss_sum / max(count, 1)
        return first  # only loss and logits describe the whole batch

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        task_ids: Tensor | None = None,
        *,
        prefix_cache: bool = False,
        **gen_kwargs,
    ) -> Tensor:
        """PromptedModel.generate's contract: the new tokens only, [B, N]. ``prefix_cache`` is
        accepted and ignored (there is no prompt prefix to cache)."""
        names = self._names(task_ids, input_ids.shape[0])
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, adapter_names=names, **gen_kwargs
        )
        return out[:, 1:] if self.is_encoder_decoder else out[:, input_ids.shape[1] :]


def _checked_names(tasks: list[str] | None) -> list[str]:
    names = [adapter_name(t) for t in tasks] if tasks else [SHARED]
    if len(set(names)) != len(names):
        raise UserError(
            f"tasks {tasks} give the same adapter name twice ('.' reads as '_')", key="lora"
        )
    return names


@contextlib.contextmanager
def _peft_quiet():
    """peft (0.21) reads transformers 5's deprecated ``is_gradient_checkpointing`` when it
    wraps a model, a FutureWarning on every LoRA load that says nothing about the user's run."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        yield


def attach(model: nn.Module, lora: LoraConfig, tasks: list[str] | None) -> AdaptedModel:
    """New adapters on ``model`` (in place): one per task, or one shared (``tasks`` None).

    Raises:
        UserError: ``lora.target_modules`` names no module of the model, or ``lora.rank``
            exceeds the width of the modules it adapts.
    """
    config = peft_config(lora, model)
    names = _checked_names(tasks)
    try:
        with _peft_quiet():
            peft_model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise UserError(str(e).splitlines()[0], key="lora.target_modules") from None
    widths = [
        min(m.in_features, m.out_features)
        for m in peft_model.modules()
        if hasattr(m, "lora_A") and isinstance(getattr(m, "in_features", None), int)
    ]
    if widths and lora.rank > min(widths):
        raise UserError(
            f"must be at most {min(widths)}, the smallest width of the modules it adapts, got "
            f"{lora.rank} (a rank above it adds cost, not capacity)",
            key="lora.rank",
        )
    return AdaptedModel(peft_model, tasks)


def check_targets(model_path: str, lora: LoraConfig) -> None:
    """Refuse ``lora.*`` settings that peft cannot apply to the model, before any training:
    the adapter is attached to a weightless (meta-device) copy of the architecture.

    Raises:
        UserError: ``lora.target_modules`` names no module of the model, or ``lora.rank``
            exceeds the width of the modules it adapts.
    """
    config = AutoConfig.from_pretrained(model_path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        attach(auto.from_config(config), lora, None)


def load_adapters(model: nn.Module, folder: str | Path, tasks: list[str] | None) -> AdaptedModel:
    """``model`` (in place) with the adapters saved by :func:`save_adapters` in ``folder``.

    Raises:
        UserError: a task's adapter is missing.
    """
    folder = Path(folder)
    names = _checked_names(tasks)
    paths = [folder if name == SHARED else folder / name for name in names]
    for path in paths:
        if not (path / "adapter_config.json").is_file():
            raise UserError("holds no peft adapter (adapter_config.json)", file=path)
    with _peft_quiet():
        peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    return AdaptedModel(peft_model, tasks)


def save_adapters(adapted: AdaptedModel, folder: str | Path) -> None:
    """Every adapter in peft's format: the shared one at ``folder``'s root, a task's in
    ``folder/<adapter_name(task)>/``."""
    adapted.model.save_pretrained(str(folder), save_embedding_layers=False)


def export(
    adapted: AdaptedModel, tokenizer, dest: Path, *, name: str, parents: list[str], merge: bool
) -> None:
    """Write a stage-2 model directory: the weights (``merge``: with the shared adapter merged
    in; else the model's own weights, adapters left out) + tokenizer + lineage, then the
    adapters in ``dest/adapters``. Works on a copy: training goes on with the adapters."""
    peft_model = copy.deepcopy(adapted.model)
    plain = peft_model.merge_and_unload() if merge else peft_model.unload()
    save_model(plain, tokenizer, dest, name=name, parents=parents)
    save_adapters(adapted, dest / ADAPTERS_DIR)
