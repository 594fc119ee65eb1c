"""The attention kernels of sequence-parallel attention: exact attention that returns its
log-sum-exp (LSE) in fp32, one per device and dtype, owned by Relay on every device.

Ring attention merges the partial results of key blocks with their LSE, so the LSE must be
exact: a bf16 LSE (what yunchang's torch-flash path returns without flash-attn: ``lse.to(q.dtype)``)
turns the merge's weights into bf16 and costs errors of 0.24-0.34 on outputs of mean magnitude
0.59 (2e-2 with an fp32 LSE). Every kernel here returns ``(out, lse)`` with ``out`` in the inputs'
dtype, ``(batch, seq, heads, head_dim)`` (yunchang's layout), and ``lse`` fp32
``(batch, heads, seq)``.

=================  ======  ===================  ===========================================
kernel             device  dtypes               op
=================  ======  ===================  ===========================================
``cpu-flash``      cpu     fp32, bf16, fp16     ``aten._scaled_dot_product_flash_attention_for_cpu``
``cuda-flash``     cuda    bf16, fp16           ``aten._scaled_dot_product_flash_attention`` (FA2)
``cuda-cudnn``     cuda    bf16, fp16           ``aten._scaled_dot_product_cudnn_attention``
``cuda-efficient`` cuda    fp32, bf16, fp16     ``aten._scaled_dot_product_efficient_attention``
``flash-attn``     cuda    bf16, fp16           ``flash_attn.flash_attn_func`` (when installed)
=================  ======  ===================  ===========================================

:func:`select` picks by device and dtype: on CUDA ``cuda-flash`` for half precision (head
dimensions up to 256, a multiple of 8) and ``cuda-efficient`` for fp32 (the flash op takes only
half precision: fp32 sequence parallelism used to die at its first attention). ``RELAY_ATTENTION``
names another kernel (``cuda-cudnn`` is often the fastest on Hopper; the device check's kernel
benchmark measures them side by side); a kernel that cannot take the dtype is refused with the
list of those that can.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
ALL = (torch.float32, torch.bfloat16, torch.float16)
#: Environment variable naming the kernel to use instead of :func:`select`'s choice.
ENV = "RELAY_ATTENTION"
#: The LSE an all-padding key block reports: finite, so that ring attention's merge stays
#: finite when such a block comes first (``-inf`` there made every later merge NaN), and low
#: enough that merging it into any real block changes nothing (its weight is exp(-1e4) = 0).
EMPTY_LSE = -1.0e4


@dataclass(frozen=True)
class Kernel:
    """One exact attention kernel (see the module docstring)."""

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    call: Callable
    max_head_dim: int = 0  # 0: any

    def accepts(self, dtype: torch.dtype, head_dim: int | None = None) -> bool:
        """Whether the kernel takes ``dtype`` inputs with ``head_dim``."""
        if dtype not in self.dtypes:
            return False
        if head_dim is not None and self.max_head_dim and (head_dim > self.max_head_dim or head_dim % 8):
            return False
        return True

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_unused):
        """``(out, lse)`` of ``q, k, v`` in yunchang's ``(batch, seq, heads, head_dim)``."""
        batch, seq, heads, _ = q.shape
        out, lse = self.call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
        # Some ops pad the LSE's sequence dim (efficient: to a multiple of 32) or add a unit dim.
        lse = lse.reshape(batch, heads, -1)[..., :seq].float()
        return out.transpose(1, 2), lse


def _cpu_flash(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]


def _cuda_flash(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def _cuda_cudnn(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                              scale=scale)[:2]


def _cuda_efficient(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                  scale=scale)[:2]


def _flash_attn(q, k, v, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  softmax_scale=scale, return_attn_probs=True)
    return out.transpose(1, 2), lse


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("cpu-flash", "cpu", ALL, _cpu_flash),
    Kernel("cuda-flash", "cuda", HALF, _cuda_flash, max_head_dim=256),
    Kernel("cuda-cudnn", "cuda", HALF, _cuda_cudnn, max_head_dim=256),
    Kernel("cuda-efficient", "cuda", ALL, _cuda_efficient),
    Kernel("flash-attn", "cuda", HALF, _flash_attn, max_head_dim=256),
)}


def _installed(name: str) -> bool:
    if name != "flash-attn":
        return True
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def select(device_type: str, dtype: torch.dtype, head_dim: int | None = None, *,
           prefer: str | None = None) -> Kernel:
    """The kernel for ``device_type`` (``cuda``, ``cpu``; ``meta`` follows the CUDA rules) and
    ``dtype``; ``prefer`` (default: ``$RELAY_ATTENTION``) names one to use instead.

    Raises:
        ValueError: ``prefer`` is unknown, not installed, for another device, or cannot take
            ``dtype`` (the message lists the kernels that can).
    """
    device = "cuda" if device_type in ("cuda", "meta") else "cpu"
    prefer = prefer if prefer is not None else (os.environ.get(ENV) or None)
    fits = [k for k in KERNELS.values() if k.device == device and k.accepts(dtype, head_dim) and _installed(k.name)]
    if prefer is not None:
        kernel = KERNELS.get(prefer)
        if kernel is None or kernel not in fits:
            known = ", ".join(k.name for k in fits)
            raise ValueError(f"{ENV}={prefer}: not a {device} kernel for {str(dtype).removeprefix('torch.')}"
                             f"{f' with head_dim {head_dim}' if head_dim else ''} here; these are: {known}")
        return kernel
    order = ("cuda-flash", "cuda-efficient") if device == "cuda" else ("cpu-flash",)
    return next(KERNELS[name] for name in order if KERNELS[name] in fits)


def masked(kernel: Callable) -> Callable:
    """Wraps ``kernel`` so that keys marked as padding (NaN in the first feature) are dropped.

    The mark travels inside the key tensor through yunchang's all-to-all and ring exchanges, so
    every ring step knows which of the keys it received are padding. Used only when the token
    count does not divide the sequence-parallel degree (a host sync per call is acceptable
    there). A block made only of padding yields zero output and the finite :data:`EMPTY_LSE`:
    merged into a real block it weighs nothing, and when it is the first block a ring rank sees
    (its own chunk is all padding, so all its queries are padding rows, dropped at the gather)
    the merge stays finite instead of turning NaN.
    """

    def wrapped(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        keep = ~torch.isnan(k[0, :, 0, 0])
        if not bool(keep.all()):
            if not bool(keep.any()):
                batch, seq, heads, _ = q.shape
                lse = torch.full((batch, heads, seq), EMPTY_LSE, dtype=torch.float32, device=q.device)
                return torch.zeros_like(q), lse
            k, v = k[:, keep], v[:, keep]
        return kernel(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs)

    return wrapped
