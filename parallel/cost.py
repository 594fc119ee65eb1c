"""Cost model of Wan 2.2 inference on a GPU group: seconds and memory from FLOPs, bytes and
datasheets (the engine of ``relay plan``; :mod:`parallel.plan` enumerates and ranks layouts).

One transformer forward per rank, layout ``cfg x ring x ulysses`` (``P = ring x ulysses`` splits
the ``S`` tokens; width ``D``, ``L`` layers):

* tensor: ``FLOPs / P / (tensor_efficiency x peak_bf16)`` (FLOPs from the model family's spec);
* element-wise: ``elementwise_bytes x (S/P) x D x L / memory_bandwidth``: norms, modulation, RoPE,
  GELU, residual adds and all-to-all packing are memory-bound. ``tensor_efficiency`` and
  ``elementwise_bytes`` are the only constants fitted to the published Wan 2.2 timings, so any
  catalog GPU is priced from its datasheet (peak, bandwidth, links) alone;
* Ulysses all-to-all, not overlapped (attention waits for it): 4 per layer, each moving
  ``(U-1)/U`` of the rank's bf16 ``S/P x D`` activations (``4(P-1)/P^2 x S x D x 2`` bytes);
* ring attention: ``R-1`` K/V passes per layer overlapped with the attention of the block in hand,
  plus an fp32 merge of each partial output (element-wise);
* FSDP all-gather of each block's bf16 parameters every forward, prefetched behind the previous
  block's compute.

An overlapped transfer costs its excess over the compute it hides behind plus
``overlap_slowdown`` of the hidden part (NCCL kernels take SMs). Links: NVLink inside the NVLink
domain, else PCIe inside a node, else the per-GPU network rate (groups are packed onto nodes),
each at ``link_efficiency``. Per request: text encoding (the negative prompt too under CFG), I2V's
conditioning-video encode, the VAE decode (fp32 on TF32 tensor cores, efficiency from a published
VAE timing; on one rank, split by rows over a group's ranks, or tiled) and expert swaps when offloading; model loading is not counted. Memory per
rank: expert parameters (/ FSDP degree), text encoder, VAE, one block's activations, FSDP buffers,
the VAE decode workspace, CUDA context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache

from relay.engine.errors import ValidationError
from relay.engine.experts import DENSE, HIGH, LOW
# The catalog lives in parallel.catalog; its names stay importable from here, where the planner
# and its callers have always found them.
from relay.parallel.catalog import (  # noqa: F401
    DATA_DIR, CatalogModel, GpuSpec, TextEncoderSpec, VaeSpec, find_gpu, find_model, gpus, models)
from relay.parallel.layout import ParallelLayout

GIB = 2**30
BF16 = 2


@dataclass(frozen=True, kw_only=True)
class VaeCalibration:
    """Fraction of the peak the VAE reaches, and its decode workspace in fp32 bytes per pixel."""

    decode_efficiency: float
    encode_efficiency: float
    workspace_bytes_per_pixel: float


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The cost model's constants (``data/calibration.json``; sources there)."""

    tensor_efficiency: float
    elementwise_bytes: float
    link_efficiency: float
    overlap_slowdown: float
    no_p2p_factor: float
    activation_bytes: float
    cuda_context_gib: float
    usable_memory_fraction: float
    fsdp_buffer_layers: int
    solver_history: int
    param_bytes: int
    vae: Mapping[str, VaeCalibration]


def calibration_data() -> dict:
    """The raw ``calibration.json``."""
    return json.loads((DATA_DIR / "calibration.json").read_text())


@cache
def load_calibration() -> Calibration:
    """The shipped calibration, VAE efficiencies derived from the published VAE timings."""
    raw = calibration_data()
    assumed = {k: v["value"] for k, v in raw["assumed"].items()}
    vae, specs = {}, {m.vae.name: m.vae for m in models().values()}
    for name, m in raw["vae_measurements"].items():
        spec, gpu = specs[name], gpus()[m["gpu"]]
        pixels = m["width"] * m["height"] * m["frames"]
        peak = (gpu.bf16_tflops if m["dtype"] == "bf16" else gpu.tf32_tflops) * 1e12
        workspace = (m["peak_gib"] * GIB - spec.params * BF16) / (m["width"] * m["height"])
        vae[name] = VaeCalibration(
            decode_efficiency=spec.decode_flops_per_pixel * pixels / m["decode_s"] / peak,
            encode_efficiency=spec.encode_flops_per_pixel * pixels / m["encode_s"] / peak,
            workspace_bytes_per_pixel=workspace * (4 / BF16 if m["dtype"] == "bf16" else 1))
    for name, spec in specs.items():  # a VAE without published timings: a named stand-in's
        if name not in vae and spec.calibration_from in vae:
            vae[name] = vae[spec.calibration_from]
    return Calibration(tensor_efficiency=raw["fitted"]["tensor_efficiency"],
                       elementwise_bytes=raw["fitted"]["elementwise_bytes"], vae=vae, **assumed)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One request's shape: model, video size, steps per expert and guidance per expert."""

    model: CatalogModel
    width: int
    height: int
    frames: int
    steps: int
    expert_steps: Mapping[str, int]
    guidance: Mapping[str, float]
    tokens: int
    flops: Mapping[str, float]
    #: Forwards per step by expert when the model says (``CatalogModel.forwards_per_step``).
    forwards: Mapping[str, int] | None = None

    @property
    def pixels(self) -> int:
        """Output pixels of the whole video."""
        return self.width * self.height * self.frames

    def forwards_per_step(self, expert: str) -> int:
        """Transformer forwards per step: the model's own count (LTX-2: 4), else 2 with
        classifier-free guidance (> 1) and 1 without."""
        if self.forwards is not None:
            return self.forwards[expert]
        return 2 if self.guidance[expert] > 1 else 1

    @property
    def latent_bytes(self) -> float:
        """Bytes of the fp32 latents."""
        vae = self.model.vae
        t = (self.frames - 1) // vae.temporal_stride + 1
        return 4.0 * vae.latent_channels * t * (self.height // vae.spatial_stride) * (self.width // vae.spatial_stride)


def make_workload(model: CatalogModel, *, width: int | None = None, height: int | None = None,
                  frames: int | None = None, steps: int | None = None, preset: str | None = None) -> Workload:
    """A :class:`Workload` at the model's reference settings, with the given overrides.

    ``preset`` prices a family recipe (Wan ``lightning``: 4 Euler steps at the distilled
    timesteps, guidance 1, so one forward per step); ``steps``, when given, still wins.

    Raises:
        ValidationError: ``size`` (not a multiple of the model's stride, or outside 16..2048),
            ``frames`` (not 4k+1 in 1..257), ``steps`` (outside 1..1000) or ``preset`` (unknown).
    """
    from relay.engine.models import get_spec

    d = model.defaults
    recipe = {}
    if preset is not None:
        recipes = get_spec(model.family).recipes
        if preset not in recipes:
            raise ValidationError("preset", f"unknown preset {preset!r}; known: {', '.join(recipes)}")
        recipe = dict(recipes[preset])
        if steps is not None:
            recipe.pop("timesteps", None)
        d = replace(d, **{k: v for k, v in recipe.items() if k in ("steps", "shift", "guidance", "guidance_low")
                          and not (k == "guidance_low" and d.guidance_low is None)})
    width, height = d.width if width is None else width, d.height if height is None else height
    frames, steps = d.frames if frames is None else frames, d.steps if steps is None else steps
    mult = model.spatial_multiple
    if not (mult <= width <= 2048 and mult <= height <= 2048) or width % mult or height % mult:
        raise ValidationError("size", f"{width}x{height}: width and height must be multiples of {mult} "
                                      f"in {mult}..2048 for {model.name}")
    if (frames - 1) % model.vae.temporal_stride or not 1 <= frames <= 257:
        raise ValidationError("frames", f"must be {model.vae.temporal_stride}k+1 in 1..257, got {frames}")
    if not 1 <= steps <= 1000:
        raise ValidationError("steps", f"must be in 1..1000, got {steps}")
    family = get_spec(model.family)
    if model.num_experts == 2:
        from relay.engine.stages import expert_step_counts

        counts = expert_step_counts(steps, d.shift, d.boundary, family=model.family,
                                    solver=recipe.get("solver"), timesteps=recipe.get("timesteps"))
        guidance = {HIGH: d.guidance, LOW: d.guidance_low if d.guidance_low is not None else d.guidance}
    else:
        counts, guidance = {DENSE: steps}, {DENSE: d.guidance}
    tokens = family.video_tokens(dict(model.transformer), height=height, width=width, frames=frames,
                                 vae_spatial=model.vae.spatial_stride, vae_temporal=model.vae.temporal_stride)
    flops = family.flops(dict(model.transformer), tokens, model.text_encoder.tokens)
    forwards = ({name: model.forwards_per_step for name in counts}
                if model.forwards_per_step is not None and not recipe else None)
    return Workload(model=model, width=width, height=height, frames=frames, steps=steps,
                    expert_steps=counts, guidance=guidance, tokens=tokens, flops=flops, forwards=forwards)


def link_bandwidth(gpu: GpuSpec, cal: Calibration, span: int) -> float:
    """Bytes/s per direction one GPU gets in a collective over ``span`` consecutive GPUs."""
    if span <= 1:
        return math.inf
    if span > gpu.gpus_per_node:
        rate = gpu.inter_node_gbs
    elif span <= gpu.nvlink_domain and gpu.nvlink_gbs > 0:
        rate = gpu.nvlink_gbs
    else:
        rate = gpu.pcie_gbs * (1.0 if gpu.p2p else cal.no_p2p_factor)
    return rate * 1e9 * cal.link_efficiency


@dataclass(frozen=True, kw_only=True)
class StepCost:
    """Seconds of one denoise step on a group, split into compute and exposed communication."""

    tensor_s: float
    elementwise_s: float
    alltoall_s: float
    ring_s: float
    fsdp_s: float
    cfg_s: float

    @property
    def compute_s(self) -> float:
        """Tensor-core plus memory-bound element-wise seconds."""
        return self.tensor_s + self.elementwise_s

    @property
    def comm_s(self) -> float:
        """Communication seconds not hidden behind compute."""
        return self.alltoall_s + self.ring_s + self.fsdp_s + self.cfg_s

    @property
    def total_s(self) -> float:
        """Seconds per step."""
        return self.compute_s + self.comm_s


def step_cost(work: Workload, gpu: GpuSpec, cal: Calibration, layout: ParallelLayout,
              expert: str) -> StepCost:
    """One denoise step of ``expert`` on a group laid out as ``layout`` (see the module doc)."""
    m = work.model
    L, D, S = m.layers, m.hidden, work.tokens
    P, U, R = layout.sp_degree, layout.ulysses_degree, layout.ring_degree
    rate = gpu.bf16_tflops * 1e12 * cal.tensor_efficiency
    tensor = work.flops["total"] / P / rate
    bandwidth = gpu.memory_bandwidth_gbs * 1e9
    elementwise = cal.elementwise_bytes * (S / P) * D * L / bandwidth
    alltoall = L * 4 * (U - 1) / U * (S / P) * D * BF16 / link_bandwidth(gpu, cal, U)
    ring = 0.0
    if R > 1:
        # Each extra ring step merges an fp32 partial output into the running one (read two,
        # write one: 12 bytes per element of the rank's S/P x D attention output).
        elementwise += L * (R - 1) * 12 * (S / P) * D / bandwidth
        per_layer = (R - 1) * 2 * (S / R) * (D / U) * BF16 / link_bandwidth(gpu, cal, U * R)
        ring = L * _overlapped(per_layer, work.flops["self_attention"] / L / P / rate, cal)
    fsdp = 0.0
    if layout.fsdp_degree > 1:
        f = layout.fsdp_degree
        gather = m.block_params * BF16 * (f - 1) / f / link_bandwidth(gpu, cal, f)
        fsdp = L * _overlapped(gather, (tensor + elementwise) / L, cal)
    forwards = work.forwards_per_step(expert)
    per_rank = math.ceil(forwards / layout.cfg_degree)
    cfg = 0.0
    if layout.cfg_degree == 2 and forwards >= 2:  # the halves swap their branches' predictions
        cfg = per_rank * work.latent_bytes / P / link_bandwidth(gpu, cal, layout.world_size)
    return StepCost(tensor_s=per_rank * tensor, elementwise_s=per_rank * elementwise,
                    alltoall_s=per_rank * alltoall, ring_s=per_rank * ring, fsdp_s=per_rank * fsdp,
                    cfg_s=cfg)


def _overlapped(comm: float, compute: float, cal: Calibration) -> float:
    """Cost of a transfer overlapped with ``compute``: the excess, plus the slowdown its NCCL
    kernels inflict on the compute they share the SMs with while both run."""
    return max(0.0, comm - compute) + cal.overlap_slowdown * min(comm, compute)


def encode_seconds(work: Workload, gpu: GpuSpec, cal: Calibration, *, group: int,
                   text_sharded: bool) -> float:
    """Text encoding (prompt, and the negative prompt under CFG) plus I2V's video encode."""
    te = work.model.text_encoder
    prompts = 2 if any(g > 1 for g in work.guidance.values()) else 1
    flops = 2 * (te.params - te.embedding_params) * te.tokens * prompts
    seconds = flops / (gpu.bf16_tflops * 1e12 * cal.tensor_efficiency)
    if text_sharded and group > 1:
        seconds += te.params * te.dtype_bytes * (group - 1) / group / link_bandwidth(gpu, cal, group)
    if work.model.encodes_video:
        vae = work.model.vae
        seconds += (vae.encode_flops_per_pixel * work.pixels
                    / (gpu.tf32_tflops * 1e12 * cal.vae[vae.name].encode_efficiency))
    return seconds


#: The decode modes of a group: whole frames on one rank, split by rows over the group's ranks
#: (``--vae-parallel``, :mod:`parallel.vae`), or diffusers' tiles on one rank (``--vae-tiling``).
VAE_MODES = ("whole", "parallel", "tiled")
#: diffusers' ``AutoencoderKLWan`` tiling defaults: 256-pixel tiles every 192 pixels, so each
#: pixel is decoded (256/192)^2 times and one tile's workspace is live at a time.
TILE_PIXELS, TILE_STRIDE = 256, 192
#: Collectives of a row-split decode per latent frame (one halo all-gather per padded
#: convolution, the mid-block's key/value gathers): counted on the Wan VAE decoder.
SPLIT_COLLECTIVES_PER_FRAME = 60
#: Launch latency of one small collective (NCCL all-gather of a few rows, NVLink or PCIe).
COLLECTIVE_LATENCY_S = 30e-6


def decode_seconds(work: Workload, gpu: GpuSpec, cal: Calibration, *, ranks: int = 1, mode: str = "whole") -> float:
    """VAE decode of the finished latents (fp32 on TF32 tensor cores): on one rank (``whole``),
    split by rows over ``ranks`` (``parallel``: the compute divides, plus the small collectives and
    gathering the frames on the output rank) or tiled on one rank (``tiled``: the tiles' overlap
    is decoded again)."""
    vae = work.model.vae
    compute = vae.decode_flops_per_pixel * work.pixels / (gpu.tf32_tflops * 1e12 * cal.vae[vae.name].decode_efficiency)
    if mode == "tiled":
        return compute * (TILE_PIXELS / TILE_STRIDE) ** 2
    if mode != "parallel" or ranks <= 1:
        return compute
    latent_frames = (work.frames - 1) // vae.temporal_stride + 1
    gather = work.pixels * 3 * 4 * (ranks - 1) / ranks / link_bandwidth(gpu, cal, ranks)
    return compute / ranks + gather + latent_frames * SPLIT_COLLECTIVES_PER_FRAME * COLLECTIVE_LATENCY_S


def decode_workspace_bytes(work: Workload, cal: Calibration, *, ranks: int = 1, mode: str = "whole") -> float:
    """Peak decode memory of the busiest rank above the resident weights: the published
    single-GPU workspace per output pixel, divided over the rows of ``ranks`` (``parallel``; the
    output rank also holds the gathered bands and their concatenation, about two copies of the
    frames) or bounded to one tile (``tiled``; the blended frames stay whole)."""
    per_pixel = cal.vae[work.model.vae.name].workspace_bytes_per_pixel
    frames_bytes = work.pixels * 3 * 4
    if mode == "tiled":
        return per_pixel * min(TILE_PIXELS, work.width) * min(TILE_PIXELS, work.height) + frames_bytes
    if mode != "parallel" or ranks <= 1:
        return per_pixel * work.width * work.height
    return per_pixel * work.width * work.height / ranks + 2 * frames_bytes


def offload_seconds(work: Workload, gpu: GpuSpec, cal: Calibration) -> float:
    """Host-to-GPU copies per request with ``--offload`` (each expert and the text encoder once)."""
    m = work.model
    moved = m.num_experts * m.expert_params * BF16 + m.text_encoder.params * m.text_encoder.dtype_bytes
    return moved / (gpu.pcie_gbs * 1e9 * cal.link_efficiency)


def handoff_seconds(work: Workload, gpu: GpuSpec, cal: Calibration, span: int) -> float:
    """Shipping a :class:`engine.state.DenoiseState` between stage groups: latents, solver state
    and the (fp32) text embeddings."""
    te = work.model.text_encoder
    embeds = 2 * te.tokens * int(work.model.transformer["text_dim"]) * 4
    state = work.latent_bytes * (1 + cal.solver_history) + embeds
    return state / link_bandwidth(gpu, cal, max(span, 2))


@dataclass(frozen=True, kw_only=True)
class MemoryUse:
    """Bytes on the busiest rank of a group, by component (GiB)."""

    params_gib: float
    text_encoder_gib: float
    vae_gib: float
    activations_gib: float
    fsdp_buffers_gib: float
    decode_gib: float
    context_gib: float

    @property
    def peak_gib(self) -> float:
        """Resident memory plus the larger of the denoise and decode working sets."""
        resident = self.context_gib + self.params_gib + self.text_encoder_gib + self.vae_gib
        return resident + max(self.activations_gib + self.fsdp_buffers_gib, self.decode_gib)


def memory_use(work: Workload, cal: Calibration, layout: ParallelLayout, *, experts: int,
               text_encoder: str, decodes: bool, offload: bool = False, vae: str = "whole") -> MemoryUse:
    """Peak memory per rank of a group holding ``experts`` experts (``cal.param_bytes`` each
    parameter, / FSDP degree), the text encoder as ``"device"`` (whole), ``"sharded"`` or ``"none"``,
    running the VAE decode if ``decodes`` in decode mode ``vae`` (:data:`VAE_MODES`); ``offload``
    keeps idle experts and the text encoder in host memory (one expert resident)."""
    m, gib = work.model, float(GIB)
    resident = 1 if offload else experts
    params = resident * m.expert_params * cal.param_bytes / layout.fsdp_degree
    te = m.text_encoder.params * m.text_encoder.dtype_bytes
    te = {"device": te, "sharded": te / layout.world_size, "none": 0.0}[text_encoder]
    if offload:
        te = 0.0
    s_rank, d = work.tokens / layout.sp_degree, m.hidden
    acts = s_rank * d * cal.activation_bytes
    if layout.ring_degree > 1:
        acts += 2 * 2 * (work.tokens / layout.ring_degree) * (d / layout.ulysses_degree) * BF16
    buffers = cal.fsdp_buffer_layers * m.block_params * BF16 if layout.fsdp_degree > 1 else 0.0
    decode = decode_workspace_bytes(work, cal, ranks=layout.world_size, mode=vae) if decodes else 0.0
    return MemoryUse(params_gib=params / gib, text_encoder_gib=te / gib, vae_gib=m.vae.params * 4 / gib,
                     activations_gib=acts / gib, fsdp_buffers_gib=buffers / gib, decode_gib=decode / gib,
                     context_gib=cal.cuda_context_gib)
