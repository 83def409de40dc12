"""Builds the processing core from the config (the one place that knows its constructor)."""

from __future__ import annotations

from typing import Any

from switch.config import SwitchConfig
from switch.processing.ports import ConfigDirectory, Directory, HmacPanHasher, Rules
from switch.processing.processor import Processor


def make_processor(
    config: SwitchConfig,
    router: Any,
    pan_hash_key: bytes,
    *,
    rules: Rules | None = None,
    directory: Directory | None = None,
) -> Processor:
    """`rules` / `directory`: merchant services (switch.server.admin.wiring.MerchantWiring gives the
    registry-backed ones); without them, switch.toml's terminals and merchants and no rules."""
    return Processor(
        config,
        directory=directory or ConfigDirectory(config.terminals, config.merchants),
        router=router,
        pan_hasher=HmacPanHasher(pan_hash_key),
        rules=rules,
    )
