"""Sequence parallelism for diffusion transformers, installed as removable hooks and processors.

After patch embedding a video is a sequence of ``S`` tokens. Each rank of the sequence-parallel
group keeps one contiguous chunk of ``ceil(S / P)`` tokens (the sequence is padded at the end
when ``P`` does not divide ``S``). Where the split and the gather happen is the model's own
declaration -- diffusers' ``_cp_plan``, taken from the family spec's
:class:`~engine.models.spec.SequenceParallelPlan` -- so nothing here knows Wan:

* ``{name or index: ContextParallelInput}`` on a module: split those inputs before it runs
  (``split_output=False``) or those outputs after it (``split_output=True``), along
  ``split_dim``, when the tensor has ``expected_dims`` dimensions (Wan: the rotary tables after
  ``rope``, the hidden states before ``blocks.0``, per-token timesteps at the model's input);
* ``ContextParallelOutput`` on a module: all-gather its output along ``gather_dim`` and drop
  the padding (Wan: after ``proj_out``, before unpatchify);
* the plan's self-attention modules get the family's processor with this group's kernel:
  xfuser's long-context (Ulysses + ring) attention; cross-attention to the text stays local;
* the plan's ``gathered_keys`` modules (a whole stream's queries against the split tokens, e.g.
  LTX-2's audio attending to the video) get the family's processor with :meth:`SequenceParallel.gather`,
  which all-gathers their keys and values.

Padding is exact: padded keys are marked (NaN) inside the key tensor and dropped by the
attention kernel, and padded queries are discarded at the gather. Nothing in the model's code
is edited; :meth:`SequenceParallel.remove` restores it.

A rank that does not split the sequence runs the same processors with the same kernel on its
whole sequence (:class:`LocalAttention`), so that one-device and sequence-parallel runs on a GPU
take the kernel :func:`parallel.kernels.choose` picked for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _Chunk:
    """This rank's share of the current forward's token sequence."""

    seq: int = 0
    padded: int = 0
    size: int = 0
    start: int = 0

    @property
    def valid(self) -> int:
        """Real (unpadded) tokens in this rank's chunk."""
        return max(0, min(self.size, self.seq - self.start))


def _split(tensor: torch.Tensor, dim: int, chunk: _Chunk) -> torch.Tensor:
    """This rank's chunk of ``tensor`` along ``dim``, zero-padded past the real tokens."""
    pad = chunk.padded - tensor.shape[dim]
    if pad:
        shape = list(tensor.shape)
        shape[dim] = pad
        tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    return tensor.narrow(dim, chunk.start, chunk.size).contiguous()


class SequenceParallel:
    """Splits a transformer's tokens over ``group`` as ``plan`` declares (installed on construction).

    Args:
        model: The transformer (plain or FSDP-sharded).
        plan: The family's :class:`~engine.models.spec.SequenceParallelPlan`.
        group: The sequence-parallel process group.
        rank: This rank's index in ``group`` (the chunk it owns).
        device: Device attention runs on (selects the attention kernel).
        prefer: The attention kernel to use instead of :func:`parallel.kernels.choose`'s.
    """

    def __init__(self, model, plan, *, group, rank: int, device: torch.device, prefer: str | None = None) -> None:
        from diffusers.models._modeling_parallel import ContextParallelOutput

        self.model = model
        self.group = group
        self.rank = rank
        self.degree = dist.get_world_size(group)
        self.device = device
        self.prefer = prefer
        self.chunk = _Chunk()
        self._attention = {}
        root_inputs = {}
        self._handles = []
        for path, entry in plan.cp_plan.items():
            if not path:
                root_inputs = entry
                continue
            module = model.get_submodule(path)
            if isinstance(entry, ContextParallelOutput):
                self._handles.append(module.register_forward_hook(self._gather_hook(entry)))
                continue
            inputs = {key: spec for key, spec in entry.items() if not spec.split_output}
            outputs = {key: spec for key, spec in entry.items() if spec.split_output}
            if inputs:
                self._handles.append(module.register_forward_pre_hook(self._split_inputs_hook(module, inputs),
                                                                      with_kwargs=True))
            if outputs:
                self._handles.append(module.register_forward_hook(self._split_outputs_hook(outputs)))
        # The model's own pre-hook starts each forward: a fresh chunk, then its split inputs.
        self._handles.insert(0, model.register_forward_pre_hook(self._start_hook(model, root_inputs),
                                                                with_kwargs=True))
        self._processors = []
        for attn in plan.self_attention(model):
            self._processors.append((attn, attn.get_processor()))
            attn.set_processor(plan.processor(self.attend))
        if plan.gathered_keys is not None:
            for attn in plan.gathered_keys(model):
                self._processors.append((attn, attn.get_processor()))
                attn.set_processor(plan.gather_processor(self.gather))

    # --- the chunk ------------------------------------------------------------------------------
    def _split(self, tensor: torch.Tensor, spec) -> torch.Tensor:
        if spec.expected_dims is not None and tensor.ndim != spec.expected_dims:
            return tensor  # e.g. one timestep per sample, not per token: nothing to split
        seq = tensor.shape[spec.split_dim]
        if self.chunk.seq == 0:
            size = -(-seq // self.degree)
            self.chunk = _Chunk(seq=seq, padded=size * self.degree, size=size, start=self.rank * size)
        elif seq != self.chunk.seq:
            raise RuntimeError(f"sequence-parallel split of {seq} tokens in a forward of {self.chunk.seq}")
        return _split(tensor, spec.split_dim, self.chunk)

    def _split_args(self, signature, args, kwargs, inputs):
        args, kwargs = list(args), dict(kwargs)
        for key, spec in inputs.items():
            if key in kwargs:
                if torch.is_tensor(kwargs[key]):
                    kwargs[key] = self._split(kwargs[key], spec)
                continue
            position = signature.index(key) if key in signature else None
            if position is not None and position < len(args) and torch.is_tensor(args[position]):
                args[position] = self._split(args[position], spec)
        return tuple(args), kwargs

    def _start_hook(self, model, inputs):
        signature = _parameters(model)

        def hook(module, args, kwargs):
            self.chunk = _Chunk()
            return self._split_args(signature, args, kwargs, inputs) if inputs else (args, kwargs)

        return hook

    def _split_inputs_hook(self, module, inputs):
        signature = _parameters(module)

        def hook(module, args, kwargs):
            return self._split_args(signature, args, kwargs, inputs)

        return hook

    def _split_outputs_hook(self, outputs):
        def hook(module, args, output):
            if torch.is_tensor(output):
                return self._split(output, outputs[0]) if 0 in outputs else output
            items = list(output)
            for index, spec in outputs.items():
                items[index] = self._split(items[index], spec)
            return type(output)(items)

        return hook

    def _gather_hook(self, spec):
        def hook(module, args, output):
            from relay.parallel.groups import all_gather_stacked

            if spec.expected_dims is not None and output.ndim != spec.expected_dims:
                return output
            dim = spec.gather_dim
            chunks = all_gather_stacked(output, self.group)  # (degree, *output.shape)
            gathered = chunks.movedim(0, dim).flatten(dim, dim + 1)
            return gathered.narrow(dim, 0, self.chunk.seq)

        return hook

    # --- attention ----------------------------------------------------------------------------
    def attention(self, padded: bool):
        """xfuser's long-context attention for this device (one per padding mode, cached)."""
        if padded not in self._attention:
            from relay.parallel.xdit import make_attention

            self._attention[padded] = make_attention(self.device, padded=padded, prefer=self.prefer)
        return self._attention[padded]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The kernel the family's processor calls: attention over the whole sequence for this
        rank's queries, ``(batch, local tokens, heads, head_dim)`` in and out."""
        chunk = self.chunk
        padded = chunk.padded != chunk.seq
        if padded and chunk.valid < chunk.size:
            key = key.clone()
            key[:, chunk.valid:] = float("nan")  # the mark the padding-aware kernel drops
            value = value.clone()
            value[:, chunk.valid:] = 0
        return self.attention(padded)(None, query, key, value)

    def gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each of ``tensors`` (``(batch, local tokens, ...)``, this rank's chunk) over the whole
        sequence, padding dropped: the keys and values of an attention whose queries are a
        stream every rank holds whole (the plan's ``gathered_keys``)."""
        from relay.parallel.groups import all_gather_stacked

        out = []
        for tensor in tensors:
            chunks = all_gather_stacked(tensor.contiguous(), self.group)  # (degree, batch, local, ...)
            out.append(chunks.movedim(0, 1).flatten(1, 2).narrow(1, 0, self.chunk.seq))
        return out

    def remove(self) -> None:
        """Removes every hook and restores the original attention processors."""
        for handle in self._handles:
            handle.remove()
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._handles, self._processors = [], []


class LocalAttention:
    """The plan's self-attention processors with one kernel of :mod:`parallel.kernels` on a
    rank's whole sequence (no group: nothing is split). Installed on construction.

    Args:
        model: The transformer.
        plan: The family's :class:`~engine.models.spec.SequenceParallelPlan` (its
            ``self_attention`` modules and ``processor``).
        kernel: The :class:`~parallel.kernels.Kernel` they run.
    """

    def __init__(self, model, plan, kernel) -> None:
        self.kernel = kernel
        self._processors = []
        for attn in plan.self_attention(model):
            self._processors.append((attn, attn.get_processor()))
            attn.set_processor(plan.processor(self.attend))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, heads, head_dim)`` in and out."""
        return self.kernel(query, key, value)[0]

    def remove(self) -> None:
        """Restores the original attention processors."""
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._processors = []


def _parameters(module) -> list[str]:
    """Names of ``module.forward``'s positional parameters, in order (``self`` excluded)."""
    import inspect

    return [name for name in inspect.signature(module.forward).parameters]
