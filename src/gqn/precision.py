"""The fastest training precision that keeps quality, per machine (``trainer.precision: ${gqn_precision:}``).

On CPUs with bf16 units (AVX512-BF16 or AMX-BF16) ``bf16-mixed`` autocast runs the convolutions in bf16
(the loss terms stay in fp32; measured on the default: the validation curve matches fp32 step for step, at
about twice the steps per second). On CPUs without them bf16 is emulated and slower: ``32-true``. On a
CUDA GPU with bf16 support: ``bf16-mixed``.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (Linux: the flags in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def fastest_precision(accelerator: str = "cpu") -> str:
    """``bf16-mixed`` where bf16 is native (CPU units or a bf16-capable GPU), else ``32-true``."""
    if accelerator in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def register_resolver() -> None:
    """``${gqn_precision:cpu}`` / ``${gqn_precision:gpu}`` in the configs."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gqn_precision"):
        OmegaConf.register_new_resolver("gqn_precision", lambda accelerator="cpu": fastest_precision(accelerator))
