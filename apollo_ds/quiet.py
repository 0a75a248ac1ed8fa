"""Silence the dependencies' known, irrelevant start-up messages - by message, not by category,
so every other warning still shows.

megatron-core warns four times per process that Transformer Engine / Apex are missing (the
local fallbacks are what apollo_ds uses on purpose), once about its own import layout, and
torch about ``torch.jit.script_method`` and (through DeepSpeed's ZeRO) the old names of two
collectives; DeepSpeed logs "Setting accelerator to CPU" on a machine without one. Installed
when the ``apollo_ds`` package is imported.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

KNOWN_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    r"The following imports from `dynamic_context\.py` will be removed",
    r"`torch\.jit\.script_method` is deprecated",
    # DeepSpeed's ZeRO calls these torch collectives under their old names
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)
KNOWN_LOG_LINES = ("Setting accelerator to CPU", "Setting ds_accelerator to ")


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(k) for k in KNOWN_LOG_LINES)


_FILTER = _DropKnown()


def install() -> None:
    """Idempotent: add the message filters (warnings module and DeepSpeed's logger)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    ds = logging.getLogger("DeepSpeed")      # the same object before and after DeepSpeed loads
    if _FILTER not in ds.filters:
        ds.addFilter(_FILTER)


@contextlib.contextmanager
def quiet_imports():
    """For call sites that import megatron-core / DeepSpeed lazily."""
    install()
    yield
