"""Third-party log records that every run printed and that are not the user's business, dropped at the source.

Each filter sits on the one logger that emits its record and matches that record only, so everything else those
libraries log, and every warning of the user's code, still shows:

- torchao registers its enums with torch's pytree at import, which torch >= 2.11 answers with "<enum
  'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile ..." (twice): torchao's
  deprecation to act on, imported by transformers and diffusers whenever torchao is installed (the
  ``quantization`` extra).
- diffusers logs "Unable to import `torchao` Tensor objects" when the installed torchao lacks the tensor classes
  of older torchao checkpoints; it matters only when loading such a checkpoint, which the project never does (it
  quantizes loaded weights).
- DeepSpeed, when installed (the ``deepspeed`` extra), is imported by accelerate's ``unwrap_model`` and logs
  "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." on every CPU
  run; dropped only when torch sees no GPU either (the run is then on the CPU by design; a GPU that torch sees
  and DeepSpeed does not is worth the message).
"""

from __future__ import annotations

import logging
import sys


class _DropRecords(logging.Filter):
    """Drops the records for which ``match(record)`` is true."""

    def __init__(self, match):
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.match(record)


def _torchao_enum_registration(record: logging.LogRecord) -> bool:
    enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return "is an Enum subclass" in str(record.msg) and getattr(enum, "__module__", "").startswith("torchao")


def _torchao_tensor_import(record: logging.LogRecord) -> bool:
    return str(record.msg).startswith("Unable to import `torchao` Tensor objects")


def _deepspeed_cpu_fallback(record: logging.LogRecord) -> bool:
    torch = sys.modules.get("torch")  # imported by DeepSpeed before it logs this
    return str(record.msg).startswith("Setting accelerator to CPU") and not (torch and torch.cuda.is_available())


FILTERS = {
    "torch.utils._pytree": _DropRecords(_torchao_enum_registration),
    "diffusers.quantizers.torchao.torchao_quantizer": _DropRecords(_torchao_tensor_import),
    "DeepSpeed": _DropRecords(_deepspeed_cpu_fallback),
}
"""Logger name -> the filter of its record that the project silences (both loggers are module loggers, created
before or after this: ``logging.getLogger`` returns the same object)."""


def install() -> None:
    """Add the filters of :data:`FILTERS` to their loggers (idempotent; imports nothing)."""
    for name, record_filter in FILTERS.items():
        logging.getLogger(name).addFilter(record_filter)  # a filter already there is not added twice
