"""Continual-learning strategies; importing this package registers every built-in one."""

from continual.strategies.am_lora import AmLora
from continual.strategies.base import STRATEGIES, Strategy, get_strategy, register_strategy
from continual.strategies.common import ADAPTER_FILES, lora_config, save_peft_adapter
from continual.strategies.inc_lora import IncLora
from continual.strategies.o_lora import OLora
from continual.strategies.seq_lora import SeqLora

__all__ = [
    "ADAPTER_FILES",
    "STRATEGIES",
    "AmLora",
    "IncLora",
    "OLora",
    "SeqLora",
    "Strategy",
    "get_strategy",
    "lora_config",
    "register_strategy",
    "save_peft_adapter",
]
