"""Relay's attention kernels: exact attention that returns its log-sum-exp (LSE) in fp32, one
per device, dtype and GPU architecture, chosen once per rank, checked on the device before use,
and run by sequence-parallel attention and by one-device runs on CUDA alike.

Ring attention merges the partial results of key blocks with their LSE, so the LSE must be
exact: a bf16 LSE (what yunchang's torch-flash path returns without flash-attn: ``lse.to(q.dtype)``)
turns the merge's weights into bf16 and costs errors of 0.24-0.34 on outputs of mean magnitude
0.59 (2e-2 with an fp32 LSE). Every kernel here returns ``(out, lse)`` with ``out`` in the inputs'
dtype, ``(batch, seq, heads, head_dim)`` (yunchang's layout), and ``lse`` fp32
``(batch, heads, seq)``.

=================  ======  ================  ====================================================
kernel             device  dtypes            op
=================  ======  ================  ====================================================
``cpu-flash``      cpu     fp32, bf16, fp16  ``aten._scaled_dot_product_flash_attention_for_cpu``
``cuda-flash``     cuda    bf16, fp16        ``aten._scaled_dot_product_flash_attention`` (FA2)
``cuda-cudnn``     cuda    bf16, fp16        ``aten._scaled_dot_product_cudnn_attention``
``cuda-efficient`` cuda    fp32, bf16, fp16  ``aten._scaled_dot_product_efficient_attention``
``flash-attn``     cuda    bf16, fp16        ``flash_attn.flash_attn_func`` (FA2; when installed)
``flash-attn-3``   cuda    bf16, fp16        ``flash_attn_interface.flash_attn_func`` (FA3, Hopper
                                             only; when installed)
=================  ======  ================  ====================================================

**The choice** (:func:`choose`). Each GPU architecture has an order of preference
(:func:`preference`), fastest first by published figures; the first kernel of it that is
installed, takes the dtype and head size, and passes a check on this device (:func:`verify`:
its output and LSE on a small probe against float64 attention, so that a kernel a driver or a
library version breaks is passed over, with the reason logged) is the rank's kernel for that
dtype and head size. The order, not a timing, decides: every rank with the same GPU and
libraries takes the same kernel, so a group rebuilt after a failure, or a replica, produces the
same video. The orders:

* Hopper (sm90): FA3, then cuDNN, then FA2 (flash-attn, torch's flash), then efficient. FA3
  reaches 1.5-2.0x FA2's forward throughput on H100 (Shah et al., 2024, up to 740 TFLOP/s in
  fp16) and torch's cuDNN attention up to 1.75x (the PyTorch 2.5 release notes).
* Blackwell (sm100 and later): cuDNN (NVIDIA's kernels for the architecture), then torch's
  flash, flash-attn, efficient.
* Ampere and Ada (sm8x): torch's flash (FA2), flash-attn, cuDNN, efficient.
* Older: efficient (the flash and cuDNN ops need sm80).
* fp32 anywhere: efficient (the flash, cuDNN and FA ops take only half precision: fp32
  sequence parallelism used to die at its first attention).

``relay generate/serve --attention NAME`` (or ``RELAY_ATTENTION``) names the kernel instead; a
kernel that cannot take the dtype, or fails the check on the device, is refused with the reason
and the kernels that can. ``sdpa`` leaves a one-device run on the library's own attention
(torch's ``scaled_dot_product_attention`` dispatch, diffusers' processors). The device check
(``bench/device/checks.py``) times every kernel at A14B's 720p shapes beside this choice.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
ALL = (torch.float32, torch.bfloat16, torch.float16)
#: Environment variable naming the kernel to use instead of :func:`choose`'s choice (the
#: ``--attention`` flag, :attr:`launch.worker.WorkerSpec.attention`, takes precedence).
ENV = "RELAY_ATTENTION"
#: The ``--attention`` value that keeps a one-device run on the library's own attention.
LIBRARY = "sdpa"
#: The ``--attention`` value that lets :func:`choose` decide (the default).
AUTO = "auto"
#: The LSE an all-padding key block reports: finite, so that ring attention's merge stays
#: finite when such a block comes first (``-inf`` there made every later merge NaN), and low
#: enough that merging it into any real block changes nothing (its weight is exp(-1e4) = 0).
EMPTY_LSE = -1.0e4
#: Largest differences :func:`verify` accepts from float64 attention of the same (rounded)
#: inputs, by input dtype: the output (the kernels round the softmax weights and the output to
#: the inputs' dtype: an emulation of that on the probe gives 1.8e-3 in bf16 and 2.4e-4 in fp16,
#: about a tenth of these) and the LSE (fp32 throughout: ~5e-7 in the emulation; an LSE rounded
#: to bf16 or fp16 at the probe's magnitude of ~6 is off by up to 1.6e-2 or 2e-3).
VERIFY_TOLERANCE = {torch.bfloat16: (2e-2, 1e-4), torch.float16: (4e-3, 1e-4), torch.float32: (1e-4, 1e-4)}


@dataclass(frozen=True)
class Kernel:
    """One exact attention kernel (see the module docstring).

    Attributes:
        name: What ``--attention`` calls it.
        device: ``cuda`` or ``cpu``.
        dtypes: Input dtypes it takes.
        call: ``(q, k, v, scale) -> (out, lse)`` in ``(batch, heads, seq, head_dim)``.
        max_head_dim: Largest head size (a multiple of 8 up to it); 0: any.
        capabilities: ``(low, high)`` CUDA compute capabilities it runs on (``high`` exclusive);
            ``None``: any.
        package: Module that must be importable (kernels from outside torch).
    """

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    call: Callable
    max_head_dim: int = 0  # 0: any
    capabilities: tuple[tuple[int, int], tuple[int, int]] | None = None
    package: str | None = field(default=None)

    def accepts(self, dtype: torch.dtype, head_dim: int | None = None) -> bool:
        """Whether the kernel takes ``dtype`` inputs with ``head_dim``."""
        if dtype not in self.dtypes:
            return False
        if head_dim is not None and self.max_head_dim and (head_dim > self.max_head_dim or head_dim % 8):
            return False
        return True

    def runs_on(self, capability: tuple[int, int] | None) -> bool:
        """Whether the kernel runs on a GPU of compute ``capability`` (``None``: unknown: yes)."""
        if capability is None or self.capabilities is None:
            return True
        low, high = self.capabilities
        return low <= tuple(capability) < high

    def raw(self, q, k, v, softmax_scale=None):
        """``(out, lse)`` as the op returns them, the LSE in its own dtype, ``(batch, heads, seq)``."""
        batch, seq, heads, _ = q.shape
        out, lse = self.call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
        # Some ops pad the LSE's sequence dim (efficient: to a multiple of 32) or add a unit dim.
        return out.transpose(1, 2), lse.reshape(batch, heads, -1)[..., :seq]

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_unused):
        """``(out, lse)`` of ``q, k, v`` in yunchang's ``(batch, seq, heads, head_dim)``."""
        out, lse = self.raw(q, k, v, softmax_scale)
        return out, lse.float()


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


_FA3: tuple | None = None  # (flash_attn_func, its extra arguments), once imported


def _fa3():
    """FA3's ``flash_attn_func`` and the arguments that make it return the LSE: later builds
    return it only with ``return_attn_probs``, earlier ones always. Resolved at the first call
    (the check on the device, eager), so a compiled block only reads a global."""
    global _FA3
    if _FA3 is None:
        import inspect

        from flash_attn_interface import flash_attn_func

        try:
            asks = "return_attn_probs" in inspect.signature(flash_attn_func).parameters
        except (TypeError, ValueError):
            asks = False
        _FA3 = (flash_attn_func, {"return_attn_probs": True} if asks else {})
    return _FA3


def _flash_attn_3(q, k, v, scale):
    func, extra = _FA3 if _FA3 is not None else _fa3()
    result = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, **extra)
    if not isinstance(result, (tuple, list)) or len(result) < 2:
        raise RuntimeError("this flash_attn_interface returns no log-sum-exp")
    return result[0].transpose(1, 2), result[1]


SM80, SM90, SM100, NEVER = (8, 0), (9, 0), (10, 0), (99, 0)

KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("cpu-flash", "cpu", ALL, _cpu_flash),
    Kernel("cuda-flash", "cuda", HALF, _cuda_flash, max_head_dim=256, capabilities=(SM80, NEVER)),
    Kernel("cuda-cudnn", "cuda", HALF, _cuda_cudnn, max_head_dim=256, capabilities=(SM80, NEVER)),
    Kernel("cuda-efficient", "cuda", ALL, _cuda_efficient),
    Kernel("flash-attn", "cuda", HALF, _flash_attn, max_head_dim=256, capabilities=(SM80, NEVER),
           package="flash_attn"),
    Kernel("flash-attn-3", "cuda", HALF, _flash_attn_3, max_head_dim=256, capabilities=(SM90, SM100),
           package="flash_attn_interface"),
)}


def preference(device_type: str, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Kernel names in order of preference on ``device_type`` (``meta`` follows CUDA) with compute
    ``capability`` (``None``: unknown, the Ampere order): see the module docstring."""
    if device_type not in ("cuda", "meta"):
        return ("cpu-flash",)
    major = 8 if capability is None else capability[0]
    if major == 9:
        return ("flash-attn-3", "cuda-cudnn", "flash-attn", "cuda-flash", "cuda-efficient")
    if major >= 10:
        return ("cuda-cudnn", "cuda-flash", "flash-attn", "cuda-efficient")
    if major == 8:
        return ("cuda-flash", "flash-attn", "cuda-cudnn", "cuda-efficient")
    return ("cuda-efficient",)


def _installed(name: str) -> bool:
    package = KERNELS[name].package
    return package is None or importlib.util.find_spec(package) is not None


def candidates(device_type: str, dtype: torch.dtype, head_dim: int | None = None,
               capability: tuple[int, int] | None = None, *, installed: bool = True) -> list[Kernel]:
    """The kernels that may run here, in order of :func:`preference`: installed (unless
    ``installed`` is false), built for this device and architecture, taking ``dtype`` and
    ``head_dim``."""
    return [KERNELS[name] for name in preference(device_type, capability)
            if (not installed or _installed(name)) and KERNELS[name].runs_on(capability)
            and KERNELS[name].accepts(dtype, head_dim)]


def requested(prefer: str | None) -> str | None:
    """The kernel asked for: ``prefer``, else ``$RELAY_ATTENTION``; ``None`` for ``auto``."""
    name = prefer if prefer is not None else (os.environ.get(ENV) or None)
    return None if name in (None, AUTO) else name


def _describe(device_type, dtype, head_dim, capability) -> str:
    what = f"{device_type} kernel for {str(dtype).removeprefix('torch.')}"
    if head_dim:
        what += f" with head_dim {head_dim}"
    if capability is not None:
        what += f" on sm{capability[0]}{capability[1]}"
    return what


def select(device_type: str, dtype: torch.dtype, head_dim: int | None = None, *,
           capability: tuple[int, int] | None = None, prefer: str | None = None,
           installed: bool = True) -> Kernel:
    """The first of :func:`candidates` (no check on a device: what a driver without the GPU can
    say); ``prefer`` (default: ``$RELAY_ATTENTION``; ``auto``: none) names one to use instead;
    ``installed`` false: kernels from packages this process lacks count too (the ranks run
    elsewhere: a Ray cluster's nodes).

    Raises:
        ValueError: ``prefer`` is unknown, not installed, for another device or architecture, or
            cannot take ``dtype`` (the message lists the kernels that can).
    """
    device = "cuda" if device_type in ("cuda", "meta") else "cpu"
    fits = candidates(device, dtype, head_dim, capability, installed=installed)
    prefer = requested(prefer)
    if prefer is not None:
        kernel = KERNELS.get(prefer)
        if kernel is None or kernel not in fits:
            known = ", ".join(k.name for k in fits) or "none"
            why = (" (the library's attention returns no log-sum-exp: it serves one-device runs only)"
                   if prefer == LIBRARY else "")
            raise ValueError(f"attention {prefer!r}: not a {_describe(device, dtype, head_dim, capability)} "
                             f"here{why}; these are: {known}")
        return kernel
    if not fits:
        raise ValueError(f"no {_describe(device, dtype, head_dim, capability)}")
    return fits[0]


def verify(kernel: Kernel, device: torch.device, dtype: torch.dtype, head_dim: int, *,
           seq: int = 257, keys: int = 193, batch: int = 2, heads: int = 2) -> str | None:
    """Runs ``kernel`` on a probe on ``device`` -- ``batch`` videos (CFG's pair), ``seq``
    queries against ``keys`` keys (what a ring step or a padded block gives; both a multiple of
    no kernel's block) -- and compares its output and LSE with float64 attention of the same
    rounded inputs; returns why it fails (an error, a wrong shape or dtype -- the LSE must come
    out of the op in fp32 --, a difference beyond :data:`VERIFY_TOLERANCE`), or ``None``."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seq, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    k, v = (torch.randn(batch, keys, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
            for _ in range(2))
    try:
        out, lse = kernel.raw(q, k, v)
    except Exception as exc:  # noqa: BLE001 - any failure passes the kernel over, with the reason
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    want = (batch, heads, seq)
    if out.shape != q.shape or out.dtype != dtype or lse.dtype != torch.float32 or lse.shape != want:
        return (f"returned out {tuple(out.shape)} {out.dtype} and lse {tuple(lse.shape)} {lse.dtype} "
                f"(want {tuple(q.shape)} {dtype} and {want} torch.float32)")
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = qd @ kd.transpose(-1, -2) / head_dim ** 0.5
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref = (torch.softmax(scores, dim=-1) @ vd).transpose(1, 2)
    out_err = float((out.double() - ref).abs().max())
    lse_err = float((lse.double() - ref_lse).abs().max())
    out_tol, lse_tol = VERIFY_TOLERANCE[dtype]
    if not (out_err <= out_tol and lse_err <= lse_tol):  # NaN fails too
        return f"differs from exact attention: output by {out_err:.2g} (tolerance {out_tol:g}), LSE by {lse_err:.2g} ({lse_tol:g})"
    return None


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided: the kernel, and the kernels passed over with the reason."""

    kernel: Kernel
    passed_over: dict[str, str]

    @property
    def name(self) -> str:
        """The kernel's name."""
        return self.kernel.name


_CHOICES: dict[tuple, Choice] = {}


def choose(device: torch.device | str, dtype: torch.dtype, head_dim: int | None = None, *,
           prefer: str | None = None) -> Choice:
    """This rank's kernel for ``dtype`` inputs of ``head_dim`` on ``device``: the first of
    :func:`candidates` for the device's architecture that passes :func:`verify` (or the one
    ``prefer`` / ``$RELAY_ATTENTION`` names, which must pass it); decided once per process and
    logged. On the meta device nothing runs: the first candidate is taken unchecked.

    Raises:
        ValueError: the named kernel is unknown, cannot run here or fails the check; or no
            kernel passes it (each one's reason in the message).
    """
    device = torch.device(device)
    wanted = requested(prefer)
    key = (device.type, device.index, dtype, head_dim, wanted)
    if key in _CHOICES:
        return _CHOICES[key]
    capability = None
    if device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(device))
    if wanted is not None:
        order = [select(device.type, dtype, head_dim, capability=capability, prefer=wanted)]
    else:
        order = candidates(device.type, dtype, head_dim, capability)
    passed_over: dict[str, str] = {}
    for kernel in order:
        why = None if device.type == "meta" else verify(kernel, device, dtype, head_dim or 64)
        if why is None:
            break
        passed_over[kernel.name] = why
        log.warning("attention kernel %s passed over on %s: %s", kernel.name, device, why)
    else:
        reasons = "; ".join(f"{name}: {why}" for name, why in passed_over.items()) or "none is installed"
        what = _describe(device.type, dtype, head_dim, capability)
        if wanted is not None:
            others = ", ".join(k.name for k in candidates(device.type, dtype, head_dim, capability)
                               if k.name != wanted) or "none"
            raise ValueError(f"attention {wanted!r} fails on this device as a {what}: {reasons}; "
                             f"the others here: {others}")
        raise ValueError(f"no {what} works: {reasons}")
    choice = Choice(kernel, passed_over)
    _CHOICES[key] = choice
    log.info("attention on %s%s, %s, head_dim %s: %s", device,
             f" (sm{capability[0]}{capability[1]})" if capability else "", str(dtype).removeprefix("torch."),
             head_dim, kernel.name)
    return choice


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
