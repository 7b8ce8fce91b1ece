"""The one precision policy: which of ``fp32`` and ``bf16`` a device computes in.

Training (SFT, DPO, contrastive) and evaluation ask the same question with the same words: the
config says ``auto``, ``bf16`` or ``fp32`` (:data:`speed.config.Precision`), and :func:`choose_precision`
answers ``bf16`` or ``fp32`` for a device. ``auto`` is bf16 where the device has bf16 matrix units
(CUDA with bf16 support, CPUs with AVX512-BF16 or AMX, where bf16 matrix products run about 6x
fp32's) and fp32 otherwise: TRL's configs default to bf16 even on CPUs that emulate it slowly.

It sits below training and evaluation so that neither imports the other for it; torch is imported
only when a CUDA device has to be asked.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

from speed import hardware
from speed.config import Precision

#: What the policy answers: the dtype a device computes in.
Chosen = Literal["bf16", "fp32"]


def device_name() -> str:
    """``cuda`` when a CUDA device is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), as the OS reports its
    flags (:func:`speed.hardware.cpu_info`, the one reader of the CPU's features)."""
    return bool({"avx512_bf16", "amx_bf16"} & hardware.cpu_info().flags)


def choose_precision(precision: Precision, device: str) -> Chosen:
    """``bf16`` or ``fp32``: the requested one, or for ``auto`` what the device runs fast.

    Args:
        precision: ``auto``, ``bf16`` or ``fp32``.
        device: a torch device name (``cpu``, ``cuda``, ``cuda:1``).
    """
    if precision != "auto":
        return precision
    if device.split(":")[0] == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def resolve_precision(precision: str, device: str | None = None) -> Chosen:
    """:func:`choose_precision` for a name from outside the config (a CLI flag), checked first.

    Args:
        precision: ``auto``, ``bf16`` or ``fp32``.
        device: the torch device; None: the one :func:`device_name` picks.

    Raises:
        ValueError: ``precision`` is not one of the three names.
    """
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(get_args(Precision))}, not {precision!r}")
    return choose_precision(cast(Precision, precision), device or device_name())
