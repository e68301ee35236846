"""The fastest training precision that keeps quality, per machine (``trainer.precision: ${gqn_precision:}``).

``bf16-mixed`` autocast runs the convolutions in bf16 (the loss terms stay in fp32; measured on the default: the
validation curve matches fp32 step for step). Whether that is faster depends on the CPU, not only on its flags:
- a 2-core AMD EPYC with AVX512-BF16: a GQN-core conv 1.99x the fp32 speed, the default's step 1.37x;
- a 2-core Intel Xeon with AVX512-BF16 (no AMX exposed): the same conv **0.56x**, the default's step 0.71x.
So on a CPU with bf16 units the choice is measured once (a GQN-core-sized convolution in fp32 and under bf16
autocast, interleaved, ~0.3 s) and kept in a small cache file per CPU model, torch version and thread count;
bf16 is taken only when it is at least ``MIN_BF16_SPEEDUP`` times faster. On CPUs without bf16 units bf16 is
emulated and slower: ``32-true`` without measuring. On a CUDA GPU with bf16 support: ``bf16-mixed``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: bf16 autocast must be at least this much faster than fp32 on the probe conv to be picked (noise margin)
MIN_BF16_SPEEDUP = 1.15
#: the probe: the default model's generation-core conv (batch 16, 5x5, 192 -> 256 at 8x8)
PROBE_INPUT, PROBE_WEIGHT = (16, 192, 8, 8), (256, 192, 5, 5)
CPUINFO = Path("/proc/cpuinfo")

log = logging.getLogger(__name__)


def flush_denormals() -> bool:
    """Treat denormal floats (below ~1.2e-38 in fp32) as zero, on this thread and on every thread it starts from now
    on (the CPU's flush-to-zero / denormals-are-zero modes, which new threads inherit: called before torch's first
    parallel op, its OpenMP pool gets them too; TensorFlow runs its CPU kernels this way by default). Without it a run
    whose weights drive gradients into the denormal range slows down by a large factor with nothing else to show for
    it: session 29, a checkpoint of the default with the plane views' logit at 0 (ring proxy, step 350) took 2.87 s
    per training step (batch 16, 2 threads, this Xeon) against 0.39 s with them flushed, its control 0.32 / 0.31 s
    (nothing to flush). The mode is process-wide and stays set (train(), evaluate() and render() called from Python
    leave it on). Returns False where the CPU has no such mode (then nothing changed)."""
    import torch

    return torch.set_flush_denormal(True)


def cpu_fields() -> tuple[str, set[str]]:
    """CPU model name and flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (Linux: the flags in /proc/cpuinfo)."""
    return any(flag in cpu_fields()[1] for flag in BF16_CPU_FLAGS)


def cache_path() -> Path:
    """Where measured speed-ups are kept: ``$GQN_CACHE_DIR`` or ``$XDG_CACHE_HOME/gqn`` (``~/.cache/gqn``)."""
    root = os.environ.get("GQN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gqn"
    return Path(root) / "precision.json"


def measure_bf16_speedup(repeats: int = 6) -> float:
    """fp32 time / bf16-autocast time of the probe conv on this CPU at the current torch thread count (best of
    ``repeats``, the two precisions interleaved so that a load spike hits both)."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(PROBE_INPUT), torch.randn(PROBE_WEIGHT)
    pad = PROBE_WEIGHT[-1] // 2
    best = {False: float("inf"), True: float("inf")}
    with torch.no_grad():
        for i in range(repeats + 1):
            for bf16 in (False, True):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    start = time.perf_counter()
                    F.conv2d(x, w, padding=pad)
                    took = time.perf_counter() - start
                if i:  # the first round is warm-up (oneDNN primitive creation)
                    best[bf16] = min(best[bf16], took)
    return best[False] / best[True]


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """The measured bf16 speed-up of this CPU (from the cache file when this CPU, torch version and thread count
    were measured before)."""
    import torch

    model, flags = cpu_fields()
    key = f"{model}|{','.join(sorted(f for f in flags if 'bf16' in f or 'amx' in f))}|torch {torch.__version__}|" \
          f"{torch.get_num_threads()} threads"
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    speedup = measure_bf16_speedup()
    cached[key] = speedup
    try:  # atomic: DDP ranks may write at once
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1) + "\n")
        tmp.replace(path)
    except OSError:  # a read-only home: measure again next time
        pass
    log.info("bf16 autocast on this CPU: %.2fx the fp32 speed (measured; cached in %s)", speedup, path)
    return speedup


def fastest_precision(accelerator: str = "cpu") -> str:
    """``bf16-mixed`` where bf16 is natively fast (measured on CPUs with bf16 units; a bf16-capable GPU), else
    full precision."""
    if accelerator in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if not cpu_has_bf16():
        return "32-true"
    return "bf16-mixed" if cpu_bf16_speedup() >= MIN_BF16_SPEEDUP else "32-true"


def register_resolver() -> None:
    """``${gqn_precision:cpu}`` / ``${gqn_precision:gpu}`` in the configs."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gqn_precision"):
        OmegaConf.register_new_resolver("gqn_precision", lambda accelerator="cpu": fastest_precision(accelerator))
