"""The prompt bank: versioned, immutable soft prompts on disk (DESIGN "Prompt bank on disk").

``entry`` holds the records (refs, ``meta.json``, model identity), ``store`` the
:class:`PromptBank` (lock, index, add, remove, load), ``verify`` the whole-bank check and
``peft`` the exchange with PEFT adapters.
"""

from multipromot.bank.entry import (
    INDEX_FILE,
    INDEX_SCHEMA_VERSION,
    META_FILE,
    META_SCHEMA_VERSION,
    PROMPT_FILE,
    BankEntry,
    BankProblem,
    base_model_record,
    check_definition,
    describe_model,
    format_ref,
    parse_ref,
    validate_task_name,
)
from multipromot.bank.store import PromptBank

__all__ = [
    "PromptBank",
    "BankEntry",
    "BankProblem",
    "parse_ref",
    "format_ref",
    "validate_task_name",
    "describe_model",
    "base_model_record",
    "check_definition",
    "INDEX_FILE",
    "META_FILE",
    "PROMPT_FILE",
    "INDEX_SCHEMA_VERSION",
    "META_SCHEMA_VERSION",
]
