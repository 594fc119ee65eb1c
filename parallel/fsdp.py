"""FSDP2 (``fully_shard``) loading of a transformer or text encoder, rank-locally.

A 14B expert does not fit on one device next to its activations, and even a host that could hold
it should not need to hold it once per rank. So the model is built on the meta device by its
family (the spec's ``meta_transformer`` / ``meta_text_encoder``: a
:class:`~engine.models.spec.MetaModel`), sharded here with ``fully_shard`` (one FSDP group per
block, then the root),
allocates only this rank's shards with ``to_empty``, and then fills those shards straight from
the safetensors files: each rank reads just its own rows of each tensor (``get_slice``), so no
rank -- on the device or on the host -- ever holds more than one full tensor, and that only for
tensors FSDP does not shard (buffers).

Dtypes follow the library loaders the unsharded path uses, so that sharded and unsharded runs
compute the same thing: parameters are cast to ``dtype``, except the modules the family says
diffusers and transformers keep in fp32 (``MetaModel.keep_fp32``; FSDP2 all-gathers a
mixed-dtype group as bytes, so mixed groups are fine). Non-persistent buffers are not in
checkpoints and are garbage after ``to_empty``; the ones the family knows how to rebuild
(``MetaModel.rebuild_buffers``, e.g. Wan's rotary tables) are recomputed on the CPU, and any
other one is an error rather than silent garbage.

With ``offload=True`` every ``fully_shard`` group gets a ``CPUOffloadPolicy``: the parameter
shards rest in host memory (pinned when the device is CUDA, for asynchronous copies) and each
block's shards are copied to the device only to be all-gathered for its forward, then freed
again -- for devices too small to hold even a 1/N shard of the model. FSDP2 requires offloaded
shards to be materialised on the CPU, so they are allocated (and loaded) there, while buffers,
which FSDP does not manage and the forward reads in place, still go to the device.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

logger = logging.getLogger(__name__)


def load_sharded(meta, folder: str | Path, *, mesh: DeviceMesh, device: str | torch.device,
                 dtype: torch.dtype, offload: bool = False) -> nn.Module:
    """Shards a model built on the meta device with FSDP2 over ``mesh`` and loads it rank-locally.

    Args:
        meta: The family's :class:`~engine.models.spec.MetaModel` (module on ``meta``, its
            blocks, fp32 modules, checkpoint stem, buffer rebuilders).
        folder: The folder with the safetensors checkpoint (``<stem>.safetensors`` or its index).
        mesh: 1-D device mesh to shard over (every rank of it must call this).
        device: This rank's device; only its parameter shards are allocated there.
        dtype: Parameter dtype; ``meta.keep_fp32`` modules stay fp32 (as in ``from_pretrained``).
        offload: Keep the parameter shards in host memory (``CPUOffloadPolicy``) and copy
            each block's shards to ``device`` only for its forward.

    Returns:
        The model in eval mode with ``requires_grad`` off; its parameters are ``DTensor`` shards
        (on the CPU with ``offload``, else on ``device``); buffers are on ``device``. A weight
        tied under two names (UMT5's ``shared`` / ``embed_tokens``) is loaded once.

    Raises:
        FileNotFoundError: no safetensors checkpoint in the folder.
        ValueError: a parameter or buffer is missing from the checkpoint or has the wrong shape.
    """
    fp32 = set(meta.keep_fp32) if dtype != torch.float32 else set()
    return _shard_and_load(meta.module, meta.blocks, Path(folder), meta.weights_stem, mesh=mesh,
                           device=device, dtype=dtype, fp32=fp32, offload=offload,
                           rebuilders=meta.rebuild_buffers)


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds: local shards of ``DTensor``s, whole plain tensors.

    FSDP2 pads each rank's shard storage up to the first rank's chunk size; that padding is
    not counted, so the counts of all ranks sum to exactly the full model's parameter bytes.
    """
    total = 0
    for param in module.parameters():  # deduplicated, so a tied weight counts once
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def offload_policy(device: str | torch.device, offload: bool) -> OffloadPolicy:
    """The ``fully_shard`` policy: host-resident shards (pinned only for CUDA) or none."""
    if not offload:
        return OffloadPolicy()
    # Pinned host memory lets the host-to-device copies run asynchronously; it only exists
    # for CUDA (and pinning needs a CUDA context), so any other device gets pageable memory.
    return CPUOffloadPolicy(pin_memory=torch.device(device).type == "cuda")


def _shard_and_load(model: nn.Module, blocks: Iterable[nn.Module], folder: Path, stem: str, *,
                    mesh: DeviceMesh, device: str | torch.device, dtype: torch.dtype,
                    fp32: set[str], offload: bool, rebuilders: Mapping[str, Callable]) -> nn.Module:
    """Casts ``model`` (on meta), shards ``blocks`` then the root, allocates, and loads."""
    model.requires_grad_(False)  # inference only; also keeps FSDP from tracking grads
    for name, tensor in _checkpointed(model).items():
        if tensor.is_floating_point():
            # ``.data`` assignment keeps the Parameter object, so tied weights stay tied.
            tensor.data = tensor.data.to(torch.float32 if fp32 & set(name.split(".")) else dtype)
    policy = offload_policy(device, offload)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    device = torch.device(device)
    # FSDP2 refuses (at the first forward) offloaded shards that are not on the CPU; its
    # ``_apply`` override re-pads (and, for CUDA, pins) each shard after ``to_empty``.
    model.to_empty(device=torch.device("cpu") if offload else device)
    if offload:
        _buffers_to(model, device)  # FSDP does not manage buffers: forward uses them in place
    _load_checkpoint(model, folder, stem)
    _rebuild_non_persistent_buffers(model, rebuilders)
    return model.eval()


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Moves every buffer to ``device`` (before loading); a shared buffer stays shared."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is None or buffer.device == device:
                continue
            if id(buffer) not in moved:
                moved[id(buffer)] = buffer.to(device)
            module._buffers[name] = moved[id(buffer)]


def _checkpointed(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by every name they have (tied weights appear twice)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[f"{module_name}.{name}" if module_name else name] = buffer
    return tensors


def _checkpoint_files(folder: Path, stem: str) -> dict[Path, list[str] | None]:
    """``{file: keys to read (None: all)}`` for ``stem.safetensors`` or its sharded index."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        files: dict[Path, list[str]] = {}
        for key, name in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(folder / name, []).append(key)
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors or {stem}.safetensors.index.json")


def _load_checkpoint(model: nn.Module, folder: Path, stem: str) -> None:
    """Copies each checkpoint tensor's local part into the model, one tensor at a time."""
    from safetensors import safe_open

    by_name = _checkpointed(model)
    # One canonical name per tensor object: a tied weight is loaded from whichever of its
    # names the checkpoint has, and only once.
    canonical: dict[int, str] = {}
    for name, tensor in by_name.items():
        canonical.setdefault(id(tensor), name)
    loaded: set[int] = set()
    unexpected: list[str] = []
    for file, keys in _checkpoint_files(folder, stem).items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in keys if keys is not None else handle.keys():
                target = by_name.get(key)
                if target is None:
                    unexpected.append(key)
                elif id(target) not in loaded:
                    _copy_local(handle, key, target)
                    loaded.add(id(target))
    missing = sorted(name for ident, name in canonical.items() if ident not in loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing)}")
    if unexpected:
        logger.warning("%s: ignoring %d checkpoint tensor(s) the model has no place for: %s",
                       folder, len(unexpected), ", ".join(sorted(unexpected)))


def _copy_local(handle, key: str, target: torch.Tensor) -> None:
    """Reads only ``target``'s local part of checkpoint tensor ``key`` and copies it in."""
    lazy = handle.get_slice(key)
    if list(lazy.get_shape()) != list(target.shape):
        raise ValueError(f"{key}: checkpoint shape {lazy.get_shape()} != model shape "
                         f"{list(target.shape)}")
    if isinstance(target, DTensor):
        local = target.to_local()  # this rank's rows, a view into FSDP's shard storage
        shape, offset = local_shard_bounds(target.shape, target.device_mesh, target.placements)
        if tuple(local.shape) != shape:  # our slicing must agree with FSDP's own layout
            raise ValueError(f"{key}: computed shard {shape} != FSDP shard {tuple(local.shape)}")
        index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
    else:  # buffers (and anything FSDP left unsharded) are replicated: read them whole
        local = target
        index = tuple(slice(None) for _ in target.shape)
    if local.numel() == 0:
        return  # an uneven split can leave a rank with no rows of a small tensor
    part = lazy[index] if index else handle.get_tensor(key)  # 0-d tensors cannot be sliced
    with torch.no_grad():
        local.copy_(part.to(local.dtype))  # cast on the host: less to move to the device


def local_shard_bounds(shape: torch.Size, mesh: DeviceMesh,
                       placements: Iterable) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local_shape, global_offset)`` of this rank's piece of a tensor sharded as given.

    Follows ``torch.chunk``, as DTensor and FSDP2 do: each ``Shard(d)`` splits dimension ``d``
    into chunks of ``ceil(n / k)``, so with ``n < k`` (or an unlucky remainder) the last ranks
    get short or empty pieces.
    """
    sizes, offsets = list(shape), [0] * len(shape)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not part of the mesh")
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            dim, ways = placement.dim, mesh.size(mesh_dim)
            chunk = math.ceil(sizes[dim] / ways) if sizes[dim] else 0
            start = min(coordinate[mesh_dim] * chunk, sizes[dim])
            offsets[dim] += start
            sizes[dim] = min(chunk, sizes[dim] - start)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"unsupported placement {placement!r}")
    return tuple(sizes), tuple(offsets)


def _rebuild_non_persistent_buffers(model: nn.Module, rebuilders: Mapping[str, Callable]) -> None:
    """Recomputes buffers that checkpoints do not store and ``to_empty`` left uninitialised
    (``rebuilders``: class name -> function building a fresh CPU copy of such a module)."""
    for name, module in model.named_modules():
        if not module._non_persistent_buffers_set:
            continue
        rebuild = rebuilders.get(type(module).__name__)
        if rebuild is None:
            raise ValueError(f"{name} ({type(module).__name__}) has non-persistent buffers "
                             f"{sorted(module._non_persistent_buffers_set)} that cannot be rebuilt")
        with torch.device("cpu"):  # small tables; never on the meta device a caller may have set
            fresh = rebuild(module)
        for buffer_name in module._non_persistent_buffers_set:
            value = getattr(fresh, buffer_name)
            # Keep the freshly built dtype (fp32), as from_pretrained does for non-persistent
            # buffers, instead of whatever to_empty allocated.
            setattr(module, buffer_name, value.to(getattr(module, buffer_name).device))
