"""Device and precision choices shared by pre-training, fine-tuning and scoring, so the three
can never disagree about where a model runs or in which precision."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``/None (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

    Plain ``cuda`` picks ``LOCAL_RANK`` modulo the visible devices: under torchrun each
    rank of a machine gets its own GPU, and a scheduler that shows each task only its one
    GPU (``CUDA_VISIBLE_DEVICES``) still works."""
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} requested but CUDA is not available")
        count = torch.cuda.device_count()
        index = local_rank % count if device.index is None else device.index
        if index >= count:
            raise ValueError(f"device {name}: only {count} CUDA devices are visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def amp_dtype(device: torch.device, amp: bool | None = None,
              requested: str | None = None) -> torch.dtype | None:
    """The autocast dtype, or None for full precision.

    ``amp`` None means on for CUDA and off on the CPU.  Without an explicit ``requested``
    dtype, bf16 only where the GPU computes it natively (emulated bf16, e.g. on V100/T4, is
    slower than fp32), else fp16 -- which needs a ``GradScaler`` when training
    (``grad_scaler``).  On the CPU, bf16 (autocast's CPU dtype)."""
    if not (device.type == "cuda" if amp is None else amp):
        return None
    if requested is not None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling where ``dtype`` needs it: fp16 gradients underflow without it, bf16 and
    fp32 do not (a disabled scaler passes everything through).  Make one per run and keep
    it, so its scale carries over from step to step."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, for messages."""
    return str(dtype).removeprefix("torch.")
