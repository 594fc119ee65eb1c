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

The attention kernel is Relay's on every device (:mod:`parallel.kernels`: exact attention that
returns an fp32 log-sum-exp, chosen by device, architecture and dtype); yunchang's own kernels are not used
(its TORCH_MATH path returns a zero LSE, silently wrong for ring > 1, and its TORCH_FLASH path a
bf16 one).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import types

import torch

log = logging.getLogger(__name__)

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


class KernelChoice:
    """The attention processor yunchang calls: the :mod:`parallel.kernels` kernel for the
    inputs' device, dtype and head size (:func:`parallel.kernels.choose`: once per process, checked
    on the device and logged), wrapped to drop padded keys when the sequence was padded.

    Args:
        device: Where attention runs.
        padded: Whether the sequence was padded to a multiple of the degree.
        prefer: A kernel name to use instead of the choice (``--attention``); ``None``:
            ``$RELAY_ATTENTION`` or the choice.
    """

    def __init__(self, device: torch.device, *, padded: bool, prefer: str | None = None) -> None:
        self.device, self.padded, self.prefer = device, padded, prefer
        self.chosen: dict[tuple, tuple[str, object]] = {}  # (dtype, head_dim) -> (name, kernel)

    def kernel_for(self, q):
        """The kernel ``q``'s dtype and head size get on this device (chosen once)."""
        from relay.parallel import kernels

        key = (q.dtype, q.shape[-1])
        if key not in self.chosen:
            kernel = kernels.choose(self.device, q.dtype, q.shape[-1], prefer=self.prefer).kernel
            self.chosen[key] = (kernel.name, kernels.masked(kernel) if self.padded else kernel)
        return self.chosen[key][1]

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        return self.kernel_for(q)(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs)


def make_attention(device: torch.device, *, padded: bool, prefer: str | None = None):
    """An xfuser ``xFuserLongContextAttention`` for ``device``; call after the groups exist.

    Args:
        device: Where attention runs (selects the kernel family, :mod:`parallel.kernels`).
        padded: Whether the sequence was padded to a multiple of the degree (selects the
            padding-aware kernel wrapper).
        prefer: The kernel to use instead of :func:`parallel.kernels.choose`'s choice.
    """
    x = load()
    return x.LongContextAttention(ring_impl_type="basic", attn_type=RELAY_KERNEL,
                                  attn_processor=KernelChoice(device, padded=padded, prefer=prefer))
