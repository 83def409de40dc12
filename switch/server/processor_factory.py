"""Builds the processing core from the config (the one place that knows its constructor)."""

from __future__ import annotations

from typing import Any

from switch.config import SwitchConfig
from switch.processing.ports import ConfigDirectory, HmacPanHasher
from switch.processing.processor import Processor


def make_processor(config: SwitchConfig, router: Any, pan_hash_key: bytes) -> Processor:
    return Processor(
        config,
        directory=ConfigDirectory(config.terminals, config.merchants),
        router=router,
        pan_hasher=HmacPanHasher(pan_hash_key),
    )
