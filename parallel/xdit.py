"""xDiT (xfuser) long-context attention -- yunchang's Ulysses + ring -- as Relay uses it.

Two things stand between xfuser 0.7 / yunchang 0.6.4 and a working import, handled here and
nowhere else:

* On a CPU-only torch, ``import xfuser`` raises "No Accelerators available": its config asks for
  the CUDA version at import, and its attention modules define their classes only when
  ``torch.cuda.is_available()`` at import time. Relay imports only the modules it uses (not
  xfuser's pipeline zoo), lets ``xfuser.envs`` answer "no device version, gloo backend" on a
  CPU-only build, and opens the CUDA import gate for the two attention modules alone. The
  communication code that then runs is xfuser's and yunchang's own.
* xfuser's NPU ring module imports ``update_npu_out`` from ``yunchang.ring.utils``, which
  yunchang 0.6.4 lacks; the import sits on the CUDA branch, so it breaks GPU machines too.
  When that name is missing, that one unused NPU module is replaced by a stub that refuses
  to run.

The attention kernel is chosen per device: on CUDA yunchang's flash-attention path (or torch's
flash SDPA when flash-attn is absent); on CPU torch's CPU flash SDPA op, which returns the
log-sum-exp that ring attention needs (yunchang's TORCH_MATH path returns a zero LSE, which is
silently wrong for ring > 1).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types

import torch

_ATTN_MODULE = "xfuser.core.long_ctx_attention.hybrid.attn_layer"
_RING_MODULE = "xfuser.core.long_ctx_attention.ring.ring_flash_attn"
_NPU_MODULE = "xfuser.core.long_ctx_attention.ring.ring_npu_flash_attn"


def _bare_package(name: str) -> None:
    """Registers package ``name`` without running its ``__init__`` (submodules still import)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not installed (pip install xfuser yunchang)")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def _cuda_import_gate():
    """Lets a module that defines its classes only under ``torch.cuda.is_available()`` define them."""
    original = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = original


def _stub_npu_ring_if_broken() -> None:
    import yunchang.ring.utils as ring_utils

    if hasattr(ring_utils, "update_npu_out") or _NPU_MODULE in sys.modules:
        return
    stub = types.ModuleType(_NPU_MODULE)

    def xdit_ring_npu_flash_attn_func(*args, **kwargs):
        raise NotImplementedError("NPU ring attention needs a yunchang with update_npu_out")

    stub.xdit_ring_npu_flash_attn_func = xdit_ring_npu_flash_attn_func
    sys.modules[_NPU_MODULE] = stub


_loaded: types.SimpleNamespace | None = None


def load() -> types.SimpleNamespace:
    """Imports xfuser's long-context attention and yunchang's pieces; idempotent.

    Returns:
        Namespace with ``LongContextAttention`` (xfuser's ``xFuserLongContextAttention``),
        ``AttnType`` and ``PROCESS_GROUP`` (yunchang's group registry).
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    _bare_package("xfuser")
    _bare_package("xfuser.core")
    import xfuser.envs as envs

    if not torch.cuda.is_available():
        # Only the questions xfuser asks at import/initialisation; a CPU build has no device
        # version and talks gloo.
        envs.get_device_version = lambda: None
        envs.get_torch_distributed_backend = lambda: "gloo"
    _stub_npu_ring_if_broken()
    importlib.import_module("xfuser.core.distributed")
    importlib.import_module("xfuser.core.cache_manager.cache_manager")
    gate = _cuda_import_gate() if not torch.cuda.is_available() else contextlib.nullcontext()
    with gate:
        attn = importlib.import_module(_ATTN_MODULE)
        importlib.import_module(_RING_MODULE)
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType

    if attn.xFuserLongContextAttention.__mro__[1] is object:
        raise ImportError("xfuser's long-context attention did not load (import gate stayed closed)")
    _loaded = types.SimpleNamespace(LongContextAttention=attn.xFuserLongContextAttention,
                                    AttnType=AttnType, PROCESS_GROUP=PROCESS_GROUP)
    return _loaded


class _CustomKernel:
    """Sentinel attention type: makes yunchang's kernel selection fall through to the
    ``attn_processor`` Relay passes (it matches none of yunchang's own types)."""

    value = "relay"


RELAY_KERNEL = _CustomKernel()


def cpu_flash_kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_unused):
    """Flash-style attention on CPU returning ``(out, lse)`` in yunchang's layout.

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``.

    Returns:
        ``out`` as ``(batch, seq, heads, head_dim)`` and ``lse`` as ``(batch, heads, seq)``.
    """
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal,
        scale=softmax_scale,
    )[:2]
    return out.transpose(1, 2), lse


def masked_kernel(base):
    """Wraps ``base`` so that keys marked as padding (NaN in the first feature) are dropped.

    The mark travels inside the key tensor through yunchang's all-to-all and ring exchanges, so
    every ring step knows which of the keys it received are padding. Used only when the token
    count does not divide the sequence-parallel degree (a host sync per call is acceptable
    there); a block made only of padding yields zero output and ``-inf`` log-sum-exp, which
    the ring merge ignores.
    """

    def kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        keep = ~torch.isnan(k[0, :, 0, 0])
        if not bool(keep.all()):
            if not bool(keep.any()):
                batch, seq, heads, _ = q.shape
                lse = torch.full((batch, heads, seq), float("-inf"), dtype=torch.float32, device=q.device)
                return torch.zeros_like(q), lse
            k, v = k[:, keep], v[:, keep]
        return base(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs)

    return kernel


def make_attention(device: torch.device, *, padded: bool):
    """An xfuser ``xFuserLongContextAttention`` for ``device``; call after the groups exist.

    Args:
        device: Where attention runs (selects the kernel).
        padded: Whether the sequence was padded to a multiple of the degree (selects the
            padding-aware kernel wrapper).
    """
    x = load()
    if device.type == "cuda" and not padded:
        from yunchang.globals import HAS_FLASH_ATTN

        kind = x.AttnType.FA if HAS_FLASH_ATTN else x.AttnType.TORCH_FLASH
        return x.LongContextAttention(ring_impl_type="basic", attn_type=kind)
    if device.type == "cuda":
        from functools import partial

        from yunchang.globals import HAS_FLASH_ATTN
        from yunchang.kernels import select_flash_attn_impl

        kind = x.AttnType.FA if HAS_FLASH_ATTN else x.AttnType.TORCH_FLASH
        base = select_flash_attn_impl(kind, stage="fwd-only")
        return x.LongContextAttention(ring_impl_type="basic", attn_type=RELAY_KERNEL,
                                      attn_processor=masked_kernel(partial(base)))
    base = masked_kernel(cpu_flash_kernel) if padded else cpu_flash_kernel
    return x.LongContextAttention(ring_impl_type="basic", attn_type=RELAY_KERNEL, attn_processor=base)
