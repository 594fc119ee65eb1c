"""LoRAs per expert: which files a request asks for, checked before any worker runs, and fused
into the experts' weights on the workers.

A request names LoRA files with a scale and the experts they apply to (:class:`LoraRef`;
``--lora`` both experts, ``--lora-high`` / ``--lora-low`` one). :func:`resolve_loras` turns them
into :class:`LoraChoice` entries -- absolute path, scale, experts, and the file's identity (size
and modification time) -- after reading each file through its family's converter (the spec's
``lora_weights``; for Wan diffusers' own ``lora_state_dict`` plus the keys diffusers drops) and
checking every key against the expert's modules on the meta device: a key that matches no
module, a shape that does not fit, a LoRA for another model are a :class:`LoraError` naming the
file and the first offending key, before any weights load.

On a worker, :class:`ExpertAdapters` keeps each loaded expert's weights equal to the base
weights plus the current request's LoRA set: ``W + sum_i s_i * a_i * (B_i @ A_i)`` (and bias or
norm deltas), computed in fp32 and rounded once to the weight's dtype, so a step costs nothing
extra. Under FSDP2 each rank fuses only its own rows of each sharded parameter (no rank gathers
a full expert). Before the first fuse, the touched parameters are copied to host memory (this
rank's shard only; pinned on CUDA); unfusing copies them back, so the base weights return
*exactly*, bit for bit, whatever the dtype. Switching sets between requests never reloads the
model: it is a restore plus a fuse of the touched parameters.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.engine.errors import ValidationError

#: The request field LoRA errors name.
FIELD = "lora"
#: Scales a LoRA may take (negative scales subtract a LoRA; 0 turns one off).
SCALE_RANGE = (-10.0, 10.0)
#: LoRA file suffixes read (safetensors only: no pickles from a request).
SUFFIXES = (".safetensors",)
#: Converted LoRA files kept in memory per process (by path, size and modification time).
CACHE_FILES = 8


class LoraError(ValidationError):
    """A LoRA file cannot be applied: unreadable, not a LoRA, a key that matches no module, or
    a shape that does not fit. The message names the file and the first offending key."""

    def __init__(self, path, message: str, *, key: str | None = None) -> None:
        where = f"{path}: key {key!r}: " if key else f"{path}: "
        super().__init__(FIELD, where + message)
        self.path, self.key = str(path), key


@dataclass(frozen=True, kw_only=True)
class LoraRef:
    """A LoRA as asked for.

    Attributes:
        path: The file (a path for ``relay generate``; a file name inside the server's LoRA
            directory for a served request).
        scale: Multiplier of the LoRA's delta (1.0: as trained).
        expert: ``high_noise`` or ``low_noise`` for one expert of a MoE model; ``None`` for
            every expert (the only one of a dense model).
        name: How the request named it, when that is not ``path`` (a served LoRA's file name).
    """

    path: str
    scale: float = 1.0
    expert: str | None = None
    name: str | None = None


@dataclass(frozen=True, kw_only=True)
class LoraChoice:
    """A resolved LoRA: an existing, checked file, its scale and the experts it applies to.

    ``size`` and ``mtime_ns`` identify the file's content as checked: a worker refuses a file
    that changed since, and caches converted files by this identity.
    """

    name: str
    path: str
    scale: float
    experts: tuple[str, ...]
    size: int
    mtime_ns: int
    format: str = ""

    @property
    def identity(self) -> tuple[str, int, int]:
        """``(path, size, mtime_ns)``: the file as it was checked."""
        return (self.path, self.size, self.mtime_ns)

    @classmethod
    def from_dict(cls, data: Mapping) -> LoraChoice:
        """Inverse of ``dataclasses.asdict`` (lists back to tuples)."""
        return cls(**{**data, "experts": tuple(data["experts"])})


@dataclass(kw_only=True)
class ModuleDelta:
    """What a LoRA changes in one module (tensors on the CPU, as stored).

    Attributes:
        down, up: Low-rank factors ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` (both or neither).
        scale: ``alpha / rank`` of the factors (1.0 when alpha is folded into them).
        bias: Bias delta ``(out,)`` (PEFT ``lora_B.bias``, original ``diff_b``); scaled by
            ``scale`` too, as PEFT scales ``lora_B``'s bias.
        weight: Full weight delta (original ``diff``; norm scales).
    """

    down: object = None
    up: object = None
    scale: float = 1.0
    bias: object = None
    weight: object = None


@dataclass(frozen=True, kw_only=True)
class LoraWeights:
    """A converted LoRA file: module name -> :class:`ModuleDelta`, and the layout it came in."""

    modules: Mapping[str, ModuleDelta]
    format: str

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for d in self.modules.values()
                   for t in (d.down, d.up, d.bias, d.weight) if t is not None)


# --- reading and checking ---------------------------------------------------------------------
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(absolute path, size, mtime_ns)`` of an existing regular file.

    Raises:
        LoraError: the file is missing, not a regular file, or not a ``.safetensors`` file.
    """
    target = Path(path)
    if target.suffix not in SUFFIXES:
        raise LoraError(path, f"is not a LoRA file ({' or '.join(SUFFIXES)})")
    try:
        stat = target.stat()
    except OSError as exc:
        raise LoraError(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not target.is_file():
        raise LoraError(path, "is not a regular file")
    if not os.access(target, os.R_OK):
        raise LoraError(path, "cannot be read (permission denied)")
    return str(target.resolve()), stat.st_size, stat.st_mtime_ns


def read_lora(spec, path: str | os.PathLike, *, identity: tuple | None = None) -> LoraWeights:
    """The converted LoRA file (cached by identity).

    Args:
        spec: The model family's :class:`~engine.models.spec.ModelSpec` (its ``lora_weights``).
        path: The file.
        identity: The identity the file was checked with; a different one now is an error.

    Raises:
        LoraError: unreadable, not a LoRA of a known layout, or changed since it was checked.
    """
    now = file_identity(path)
    if identity is not None and tuple(identity) != now:
        raise LoraError(path, "changed since the request was checked (size or modification time differ)")
    with _cache_lock:
        if now in _cache:
            _cache.move_to_end(now)
            return _cache[now]
    weights = spec.lora_weights(Path(now[0]))
    with _cache_lock:
        _cache[now] = weights
        while len(_cache) > CACHE_FILES:
            _cache.popitem(last=False)
    return weights


@dataclass(frozen=True)
class ModuleShape:
    """What a LoRA key may target: a module's kind and its parameter shapes."""

    kind: str  # "linear", "norm" or the class name of anything else
    weight: tuple | None
    bias: tuple | None


_tables: dict = {}


def module_table(info, expert: str) -> dict[str, ModuleShape]:
    """``{module name: ModuleShape}`` of one expert, from its config on the meta device (cached)."""
    import torch

    key = (str(info.path), expert)
    if key not in _tables:
        meta, _ = info.spec.meta_transformer(info, expert)
        table = {}
        for name, module in meta.module.named_modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if isinstance(module, torch.nn.Linear):
                kind = "linear"
            elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or "Norm" in type(module).__name__:
                kind = "norm"
            else:
                kind = type(module).__name__
            table[name] = ModuleShape(kind, tuple(weight.shape) if torch.is_tensor(weight) else None,
                                      tuple(bias.shape) if torch.is_tensor(bias) else None)
        _tables[key] = table
    return _tables[key]


def check_against(weights: LoraWeights, table: Mapping[str, ModuleShape], path) -> None:
    """Every module of ``weights`` exists in ``table`` and every tensor fits it.

    Raises:
        LoraError: naming the first offending module key (in the diffusers naming).
    """
    for name, delta in weights.modules.items():
        target = table.get(name)
        if target is None:
            raise LoraError(path, "matches no module of this model (a LoRA for another model or layout?)",
                            key=name)
        if (delta.down is None) != (delta.up is None):
            raise LoraError(path, "has only one of the two low-rank factors (lora_A / lora_B)", key=name)
        if delta.down is not None:
            if target.kind != "linear":
                raise LoraError(path, f"targets a {target.kind}; low-rank factors apply to linear layers only",
                                key=name)
            out_features, in_features = target.weight
            rank = delta.down.shape[0]
            if delta.down.ndim != 2 or delta.up.ndim != 2 or delta.up.shape[1] != rank:
                raise LoraError(path, f"factors {tuple(delta.down.shape)} and {tuple(delta.up.shape)} are not "
                                "a low-rank pair", key=name)
            if delta.down.shape[1] != in_features or delta.up.shape[0] != out_features:
                raise LoraError(path, f"is a ({delta.up.shape[0]} x {delta.down.shape[1]}) update for a "
                                f"({out_features} x {in_features}) layer (a LoRA for another model?)", key=name)
        if delta.bias is not None and (target.bias is None or tuple(delta.bias.shape) != target.bias):
            have = "no bias" if target.bias is None else f"bias {target.bias}"
            raise LoraError(path, f"bias delta {tuple(delta.bias.shape)} does not fit ({have})", key=name)
        if delta.weight is not None and (target.weight is None or tuple(delta.weight.shape) != target.weight):
            have = "no weight" if target.weight is None else f"weight {target.weight}"
            raise LoraError(path, f"weight delta {tuple(delta.weight.shape)} does not fit ({have})", key=name)


def resolve_loras(refs: Sequence[LoraRef], info, *, experts: Sequence[str]) -> tuple[LoraChoice, ...]:
    """Checks the LoRAs a request asks for against the model ``info`` (field ``lora``).

    Args:
        refs: The LoRAs as asked for, in stacking order.
        info: The model (its spec converts the files; its experts' configs check them).
        experts: The model's expert names (``high_noise``, ``low_noise``, or ``dense``).

    Returns:
        One :class:`LoraChoice` per reference, with the experts it applies to.

    Raises:
        LoraError / ValidationError: the first bad LoRA (nothing is applied).
    """
    out = []
    for ref in refs:
        if not isinstance(ref, LoraRef) or not isinstance(ref.path, str) or not ref.path:
            raise ValidationError(FIELD, f"must name a LoRA file, got {ref!r}")
        scale = ref.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            raise ValidationError(FIELD, f"{ref.path}: scale must be a number in [{SCALE_RANGE[0]:g}, "
                                  f"{SCALE_RANGE[1]:g}], got {scale!r}")
        scale = float(scale)
        if ref.expert is None:
            targets = tuple(experts)
        elif ref.expert in experts and len(experts) > 1:
            targets = (ref.expert,)
        elif len(experts) == 1:
            raise ValidationError(FIELD, f"{ref.path}: this model has a single transformer; "
                                  f"use --lora, not a LoRA for the {ref.expert} expert")
        else:
            raise ValidationError(FIELD, f"{ref.path}: unknown expert {ref.expert!r}; known: {', '.join(experts)}")
        path, size, mtime = file_identity(ref.path)
        weights = read_lora(info.spec, path)
        for expert in targets:
            check_against(weights, module_table(info, expert), ref.path)
        out.append(LoraChoice(name=ref.name or ref.path, path=path, scale=scale, experts=targets, size=size,
                              mtime_ns=mtime, format=weights.format))
    return tuple(out)


def in_directory(refs: Sequence[LoraRef], directory: str | os.PathLike | None) -> tuple[LoraRef, ...]:
    """Served requests name LoRAs by file name inside the server's LoRA directory: the same
    references with paths there.

    Raises:
        ValidationError: (field ``lora``) the server has no LoRA directory, or a name is empty,
            absolute, or resolves outside the directory (``..``, a link out of it).
    """
    if not refs:
        return ()
    if directory is None:
        raise ValidationError(FIELD, "this server has no LoRA directory (relay serve --lora-dir)")
    root = Path(directory).resolve()
    out = []
    for ref in refs:
        name = ref.path
        if not isinstance(name, str) or not name.strip():
            raise ValidationError(FIELD, "a LoRA name is empty")
        if Path(name).is_absolute() or "\\" in name:
            raise ValidationError(FIELD, f"{name!r}: name a file inside the LoRA directory, not a path")
        target = (root / name).resolve()
        if not target.is_relative_to(root):
            raise ValidationError(FIELD, f"{name!r} resolves outside the LoRA directory")
        if not target.exists():
            raise ValidationError(FIELD, f"{name!r}: no such LoRA (ListModels lists them)")
        out.append(LoraRef(path=str(target), scale=ref.scale, expert=ref.expert, name=name))
    return tuple(out)


def list_loras(directory: str | os.PathLike | None) -> list[tuple[str, int]]:
    """``[(name, bytes)]`` of the LoRA files in ``directory`` and its sub-folders (names are
    relative, with ``/``), sorted; empty without a directory."""
    if directory is None:
        return []
    root = Path(directory).resolve()
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix in SUFFIXES and path.is_file() and path.resolve().is_relative_to(root):
            out.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return out


def parse_lora_flag(text: str, *, expert: str | None = None) -> LoraRef:
    """``PATH[:SCALE]`` (a flag's value) as a :class:`LoraRef`; a tail that is not a number is
    part of the path.

    Raises:
        ValidationError: (field ``lora``) an empty path.
    """
    path, sep, tail = text.rpartition(":")
    scale = 1.0
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            path = text
    else:
        path = text
    if not path:
        raise ValidationError(FIELD, f"{text!r}: give a LoRA file, optionally with :SCALE")
    return LoraRef(path=path, scale=scale, expert=expert)


def lora_set(loras: Sequence, expert: str) -> tuple:
    """The ordered ``(identity, scale)`` set of ``loras`` (choices or their dicts) for ``expert``."""
    out = []
    for lora in loras or ():
        choice = lora if isinstance(lora, LoraChoice) else LoraChoice.from_dict(lora)
        if expert in choice.experts:
            out.append((choice, choice.scale))
    return tuple(out)


# --- alpha and rank patterns (PEFT's LoraConfig semantics) ---------------------------------------
def pattern_value(name: str, patterns: Mapping[str, float], default: float) -> float:
    """The value of the first pattern matching module ``name`` as PEFT matches them (the whole
    name or a dotted suffix, as a regular expression), else ``default``."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def alpha_scales(modules: Mapping[str, ModuleDelta], config: Mapping) -> None:
    """Sets each module's ``scale`` from a PEFT ``LoraConfig`` dict (``lora_alpha``, ``r``,
    ``alpha_pattern``, ``rank_pattern``, ``use_rslora``) stored with a diffusers-format file."""
    alpha = float(config.get("lora_alpha") or config.get("r") or 0)
    alphas = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    for name, delta in modules.items():
        if delta.down is None:
            continue
        rank = delta.down.shape[0]
        a = pattern_value(name, alphas, alpha or rank)
        delta.scale = a / math.sqrt(rank) if rslora else a / rank


# --- fusing on a worker -----------------------------------------------------------------------
@dataclass(kw_only=True)
class FuseReport:
    """What :meth:`ExpertAdapters.ensure` did for one expert.

    Attributes:
        expert: The expert.
        changed: Whether the weights changed (the set differed from the fused one).
        restore_s: Seconds restoring the base weights.
        fuse_s: Seconds fusing the new set.
        parameters: Parameters (this rank's pieces) touched.
    """

    expert: str
    changed: bool = False
    restore_s: float = 0.0
    fuse_s: float = 0.0
    parameters: int = 0


def _local(param):
    """``(local tensor, row offset)`` of a parameter: its own rows under FSDP2, else all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        # torch's own shard arithmetic (torch.chunk along each Shard dim, as FSDP2 shards)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()  # a view into FSDP's shard storage: in-place edits stick
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        if tuple(shape[1:]) != tuple(param.shape[1:]) or any(offset[1:]):
            raise NotImplementedError("LoRA fusing supports parameters sharded on dim 0 only")
        return local[: shape[0]], offset[0]
    return param.data, 0


class ExpertAdapters:
    """Keeps one loaded expert's weights equal to base + the current LoRA set (see the module
    docstring). Not thread-safe: a worker calls it between steps.

    Args:
        expert: The expert's name.
        module: The expert (plain or FSDP2-sharded).
        spec: The model family's spec (to read LoRA files).
    """

    def __init__(self, expert: str, module, spec) -> None:
        self.expert, self.module, self.spec = expert, module, spec
        self._base: dict[str, object] = {}  # "module.param" -> host copy of this rank's piece
        self._fused: tuple = ()
        self.last: FuseReport | None = None

    @property
    def fused(self) -> tuple:
        """The fused set: ``((LoraChoice, scale), ...)``; ``()`` = base weights."""
        return self._fused

    def ensure(self, loras: tuple) -> FuseReport:
        """Makes the weights base + ``loras`` (a :func:`lora_set`); nothing when already so."""
        import time

        import torch

        report = FuseReport(expert=self.expert)
        if _set_key(loras) == _set_key(self._fused):
            self.last = report
            return report
        report.changed = True
        with torch.no_grad():
            began = time.perf_counter()
            self._restore()
            report.restore_s = time.perf_counter() - began
            began = time.perf_counter()
            report.parameters = self._fuse(loras)
            self._sync()
            report.fuse_s = time.perf_counter() - began
        self._fused = tuple(loras)
        self.last = report
        return report

    def _sync(self) -> None:
        import torch

        devices = {p.device for p in self.module.parameters() if p.device.type == "cuda"}
        for device in devices:
            torch.cuda.synchronize(device)

    def _param(self, name: str):
        module_name, _, attr = name.rpartition(".")
        return getattr(self.module.get_submodule(module_name), attr)

    def _restore(self) -> None:
        """Copies the base pieces back (exact) and forgets them."""
        for name, host in self._base.items():
            local, _ = _local(self._param(name))
            local.copy_(host, non_blocking=True)
        self._base.clear()
        self._fused = ()

    def _backup(self, name: str, local) -> None:
        import torch

        if name in self._base:
            return
        pin = local.device.type == "cuda"
        host = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
        host.copy_(local)
        self._base[name] = host

    def _fuse(self, loras: tuple) -> int:
        """Adds every delta of ``loras`` to this rank's pieces; returns the pieces touched."""
        import torch

        updates: dict[str, list] = {}
        for choice, scale in loras:
            weights = read_lora(self.spec, choice.path, identity=choice.identity)
            for module_name, delta in weights.modules.items():
                updates.setdefault(module_name, []).append((delta, scale))
        touched = 0
        for module_name, deltas in updates.items():
            module = self.module.get_submodule(module_name)
            for attr in ("weight", "bias"):
                param = getattr(module, attr, None)
                parts = [(d, s) for d, s in deltas if _touches(d, attr)]
                if param is None or not parts:
                    continue
                local, row = _local(param)
                rows = local.shape[0]
                if rows == 0:
                    continue
                name = f"{module_name}.{attr}"
                self._backup(name, local)
                # Summed in fp32, rounded once; an fp32 weight is updated in place.
                work = local.float()
                for delta, scale in parts:
                    _add_delta(work, delta, attr, row, rows, scale)
                if work.data_ptr() != local.data_ptr():
                    local.copy_(work)
                touched += 1
        return touched


def _set_key(loras: tuple) -> tuple:
    """What identifies a fused set: each file as checked, with its scale, in order."""
    return tuple((choice.identity, scale) for choice, scale in loras)


def _touches(delta: ModuleDelta, attr: str) -> bool:
    if attr == "bias":
        return delta.bias is not None
    return delta.down is not None or delta.weight is not None


def _add_delta(work, delta: ModuleDelta, attr: str, row: int, rows: int, scale: float) -> None:
    """Adds rows ``[row, row + rows)`` of one LoRA's scaled delta of ``attr`` to the fp32 ``work``."""
    import torch

    def rows_of(tensor):
        return tensor[row:row + rows].to(device=work.device, dtype=torch.float32)

    if attr == "bias":  # scaled as PEFT scales lora_B's bias: with the factors' alpha / rank
        work.add_(rows_of(delta.bias), alpha=scale * delta.scale)
        return
    if delta.down is not None:
        down = delta.down.to(device=work.device, dtype=torch.float32)
        work.addmm_(rows_of(delta.up), down, alpha=scale * delta.scale)
    if delta.weight is not None:
        work.add_(rows_of(delta.weight), alpha=scale)


@dataclass(kw_only=True)
class Adapters:
    """The :class:`ExpertAdapters` of every expert a worker holds."""

    experts: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, model) -> Adapters:
        """Adapters for the experts of a :class:`~engine.loader.LoadedModel`."""
        return cls(experts={name: ExpertAdapters(name, module, model.spec)
                            for name, module in model.experts.items()})

    def ensure(self, loras, *, before=None) -> list[FuseReport]:
        """Fuses each held expert's share of ``loras`` (choices or their dicts).

        Args:
            loras: The request's resolved LoRAs.
            before: Called with the expert name before its weights change (offload parks it).
        """
        reports = []
        for name, adapters in self.experts.items():
            wanted = lora_set(loras, name)
            if before is not None and _set_key(wanted) != _set_key(adapters.fused):
                before(name)
            reports.append(adapters.ensure(wanted))
        return reports
