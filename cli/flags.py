"""The flag groups the sub-commands share, and the checks that turn them into typed configs --
all without importing torch, diffusers or Ray, so a bad flag exits 2 at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relay.engine.errors import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXECUTORS = ("local", "torchrun", "ray")
#: ``--ray-strategy`` (launch.ray_group.STRATEGIES; repeated here: flags import no Ray).
RAY_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
#: ``--attention``: ``auto``, ``sdpa`` and the kernels of parallel.kernels.KERNELS (repeated
#: here: flags import no torch; a test keeps the two lists equal).
ATTENTION_CHOICES = ("auto", "sdpa", "cpu-flash", "cuda-flash", "cuda-cudnn", "cuda-efficient", "flash-attn",
                     "flash-attn-3")


def flag(field: str) -> str:
    """The command-line spelling of a request / config field: ``guidance_low`` -> ``--guidance-low``."""
    return "--" + field.replace("_", "-")


def fail(command: str, message: str, code: int = EXIT_USAGE) -> int:
    """Prints ``relay COMMAND: error: MESSAGE`` and returns ``code``."""
    print(f"relay {command}: error: {message}", file=sys.stderr)
    return code


def refuse(command: str, exc: Exception) -> int:
    """Exit 2 for a bad flag (:class:`ValidationError`, naming it) or an unusable ``--model``."""
    if isinstance(exc, ValidationError):
        return fail(command, f"{flag(exc.field)}: {exc.message}")
    return fail(command, f"--model: {exc}")


def say(quiet: bool, text: str) -> None:
    """A progress line on stderr, unless ``quiet``."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)


# --- flag groups ---------------------------------------------------------------------------------
def generation_flags(parser: argparse.ArgumentParser, *, submit: bool = False) -> None:
    """The request's settings (``relay generate`` and, with ``submit``, ``relay submit``)."""
    g = parser.add_argument_group("generation settings (unset: the model folder's, then the Wan 2.2 "
                                  "reference value; relay generate prints each setting's source)")
    g.add_argument("--prompt", required=True, help="what the video shows (at most 512 tokens)")
    g.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    g.add_argument("--height", type=int, help="pixels; a multiple of 16 (32 for TI2V-5B)")
    g.add_argument("--width", type=int, help="pixels; a multiple of 16 (32 for TI2V-5B)")
    g.add_argument("--frames", type=int, help="frame count, 4k+1 (81 for A14B, 121 for TI2V-5B)")
    g.add_argument("--steps", type=int, help="denoising steps, 1..1000 (40 for A14B, 50 for TI2V-5B)")
    g.add_argument("--seed", type=int, help="0..2^63-1; unset or -1: random (the seed used is printed)")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance of the high-noise expert (or the only one); 1 = off")
    g.add_argument("--guidance-low", type=float,
                   help="guidance of the low-noise expert (MoE models; default: --guidance when given)")
    g.add_argument("--shift", type=float,
                   help="flow-matching sigma shift (default: the folder's scheduler config flow_shift)")
    g.add_argument("--boundary", type=float,
                   help="fraction of the noise range where the low-noise expert takes over "
                        "(MoE models; default: the folder's model_index.json)")
    g.add_argument("--fps", type=int, help="frames per second of the mp4 (16 for A14B, 24 for TI2V-5B)")
    g.add_argument("--image", help="first frame for image-to-video (PNG/JPEG/WebP)")
    g.add_argument("--solver", choices=("unipc", "euler"),
                   help="unipc (the folder's UniPC multistep) or euler (flow-match Euler, for distilled LoRAs)")
    g.add_argument("--timesteps", metavar="T1,T2,...",
                   help="explicit schedule before the flow shift, e.g. 1000,750,500,250 (needs --solver euler; "
                        "--steps defaults to its length)")
    g.add_argument("--preset", metavar="NAME",
                   help="a named recipe; lightning: the 4-step Wan 2.2 Lightning distill schedule (euler, "
                        "1000,750,500,250, shift 5, guidance 1); flags given win")
    g.add_argument("--cache", metavar="SPEC",
                   help="feature cache of every expert: none, fbc:THRESHOLD (first-block cache, e.g. fbc:0.05), "
                        "mag:THRESHOLD[,k=K][,retention=R],ratios=R0/R1/... (ratios from a mag:calibrate run's "
                        "stats), taylorseer[:interval=N,warmup=W,order=O]; default none")
    g.add_argument("--cache-high", metavar="SPEC", help="the high-noise expert's cache (MoE models), overriding --cache")
    g.add_argument("--cache-low", metavar="SPEC", help="the low-noise expert's cache (MoE models), overriding --cache")
    g.add_argument("--guidance-terms", metavar="NAME=VALUE,...",
                   help="LTX-2's guidance beyond --guidance (defaults: diffusers'): audio=7 (the sound's CFG), "
                        "stg=1 / audio_stg=1 (spatio-temporal guidance, 0 = off), stg_blocks=28 (blocks joined "
                        "by +), modality=3 / audio_modality=3 (audio-video isolation, 1 = off), rescale=0.7 / "
                        "audio_rescale=0.7")
    where = "a file in the server's --lora-dir" if submit else "a .safetensors file"
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help=f"LoRA for every expert ({where}; scale default 1.0); repeat to stack")
    g.add_argument("--lora-high", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA for the high-noise expert only (MoE models); repeatable")
    g.add_argument("--lora-low", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA for the low-noise expert only (MoE models); repeatable")


def lora_refs(args) -> tuple:
    """The ``--lora`` / ``--lora-high`` / ``--lora-low`` flags as :class:`engine.lora.LoraRef`s
    (every expert's first, then the high-noise, then the low-noise expert's)."""
    from relay.engine.lora import parse_lora_flag

    return (tuple(parse_lora_flag(text) for text in args.lora)
            + tuple(parse_lora_flag(text, expert="high_noise") for text in args.lora_high)
            + tuple(parse_lora_flag(text, expert="low_noise") for text in args.lora_low))


def parse_timesteps(text: str | None) -> tuple[float, ...] | None:
    """``--timesteps`` as numbers (checked further by the model's rules).

    Raises:
        ValidationError: (field ``timesteps``) a value that is not a number.
    """
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValidationError("timesteps", f"must be comma-separated numbers, got {text!r}") from None


def runtime_flags(parser: argparse.ArgumentParser, *, output: bool = True, model: bool = True) -> None:
    """Model, dtype, device and output flags."""
    r = parser.add_argument_group("model and runtime")
    if model:
        r.add_argument("--model", help="diffusers-format Wan 2.2 directory or cached hub id "
                                       "(default: the embedded tiny T2V model)")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="transformer/text-encoder dtype (default: bf16 on CUDA, fp32 on CPU)")
    r.add_argument("--device", help="cpu, cuda or cuda:N, the first device of the groups "
                                    "(default: cuda if present)")
    r.add_argument("--offload", action="store_true",
                   help="one device: keep the text encoder and experts in CPU memory, moving each "
                        "to the GPU only while it runs; a group with --fsdp: keep the FSDP shards "
                        "in CPU memory between uses (FSDP2 CPU offload)")
    r.add_argument("--attention", choices=ATTENTION_CHOICES,
                   help="attention kernel (parallel/kernels.py): auto takes the first kernel of the GPU "
                        "architecture's order (fastest first by published figures: Hopper FA3 if installed, "
                        "then cuDNN; Ampere/Ada torch flash) that passes a check on the device; sdpa keeps "
                        "one-device groups on torch's own dispatch (default: $RELAY_ATTENTION, else auto)")
    if output:
        r.add_argument("--output", required=True, help="output file: .mp4 (H.264) or .npy (float32 frames)")
        r.add_argument("--stats", metavar="PATH.json",
                       help="write the run stats (settings and sources, seconds per stage, forwards "
                            "per expert, memory per rank, layout) to this JSON file")
        r.add_argument("--quiet", action="store_true", help="no progress output")


def parallel_flags(parser: argparse.ArgumentParser) -> None:
    """The layout of one group (cfg x ulysses x ring, FSDP, text encoder)."""
    p = parser.add_argument_group(
        "parallel execution (one video on N devices: NCCL on CUDA, gloo on CPU)")
    p.add_argument("--nproc", type=int, default=1,
                   help="fused: devices per group (default 1); staged: devices split between the two "
                        "stage groups (1 means the minimum, 2)")
    p.add_argument("--ulysses", type=int,
                   help="Ulysses sequence-parallel degree; must divide the heads (40 A14B, 24 5B)")
    p.add_argument("--ring", type=int, help="ring-attention sequence-parallel degree")
    p.add_argument("--cfg-parallel", type=int, choices=(1, 2),
                   help="2: conditional and unconditional forwards on two halves of the group")
    p.add_argument("--fsdp", type=int, nargs="?", const=-1,
                   help="shard each expert with FSDP2: alone = over the sequence-parallel ranks, "
                        "or a degree (the sequence-parallel degree or nproc)")
    p.add_argument("--layout", metavar="SPEC",
                   help='the same layout as one string, e.g. "ulysses=2,fsdp=2" (instead of the flags above)')
    p.add_argument("--text-encoder", choices=("device", "cpu", "fsdp"), default="device",
                   help="text encoder placement in a group: a copy per device, on the host CPU, "
                        "or sharded over all ranks")
    p.add_argument("--vae-parallel", action="store_true",
                   help="split the VAE decode (and the I2V/TI2V image encode) by rows over the ranks of the "
                        "group that runs it (exact; needs --nproc 2 or more)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="diffusers' tiled VAE decode: bounded memory on one GPU (overlapping tiles are "
                        "blended, so frames differ slightly from the untiled decode)")


def executor_flags(parser: argparse.ArgumentParser) -> None:
    """How the workers exist and how the groups are placed."""
    e = parser.add_argument_group("executor and placement")
    e.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: this process (one device) or spawned local processes; torchrun: "
                        "re-run under torchrun --standalone; ray: Ray actors in placement groups "
                        "(default local)")
    e.add_argument("--placement", choices=("fused", "staged"), default="fused",
                   help="fused: each group holds both experts; staged: the high-noise and the "
                        "low-noise expert on separate groups, the state handed over at the boundary")
    e.add_argument("--replicas", type=int, default=1, help="fused: identical groups (data parallel)")
    e.add_argument("--stage-split", metavar="HIGH:LOW",
                   help="staged: devices per expert group (default: balanced to the step counts)")
    e.add_argument("--high-layout", metavar="SPEC", help='staged: layout of the high-noise group, e.g. "ulysses=4,fsdp=4"')
    e.add_argument("--low-layout", metavar="SPEC", help="staged: layout of the low-noise group")
    e.add_argument("--encode-on", choices=("high", "low", "own"), default="high",
                   help="staged: group that encodes text/image (own: a device of its own)")
    e.add_argument("--decode-on", choices=("high", "low", "own"), default="low",
                   help="staged: group that VAE-decodes (own: a device of its own)")
    e.add_argument("--ray-address", help="ray: an existing cluster (default: start a local Ray)")
    e.add_argument("--ray-strategy", choices=RAY_STRATEGIES, default="STRICT_PACK",
                   help="ray: placement-group strategy of each group; STRICT_PACK keeps a group on one "
                        "node, PACK / SPREAD prefer one / many, STRICT_SPREAD puts each rank on its own node")
    e.add_argument("--ray-resources", metavar="[GROUP=]NAME,...",
                   help="ray: place groups only on nodes that carry these custom resources (node tags: "
                        "ray start --resources '{\"NAME\": 1}'); NAME alone: every group, GROUP=NAME: that "
                        "group (fused0.., high, low, aux), e.g. high=h100,low=a100")
    e.add_argument("--checkpoint-every", type=int, default=1,
                   help="steps between the scheduler's in-memory checkpoints (default 1)")
    e.add_argument("--step-timeout", type=float, default=300.0,
                   help="watchdog seconds per step before a group is declared hung")
    e.add_argument("--max-retries", type=int, default=2, help="group failures one request may survive (default 2)")
    e.add_argument("--health-period", type=float, default=30.0, metavar="S",
                   help="ping a worker group idle this long; 0: never (default 30)")
    e.add_argument("--health-timeout", type=float, default=10.0, metavar="S",
                   help="seconds every rank has to answer; a group that does not is rebuilt (default 10)")
    e.add_argument("--rebuild-retry", type=float, default=30.0, metavar="S",
                   help="a group that could not be rebuilt (a node lost, no room left) tries again this "
                        "often and serves once built; 0: retire it for good (default 30)")


def checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """Snapshot files written during a generation."""
    c = parser.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", help="write denoise-state snapshots into this folder")
    c.add_argument("--checkpoint-at", default="",
                   help="comma-separated step counts after which to snapshot (e.g. 5,20)")


# --- checks (no torch, diffusers or Ray) --------------------------------------------------------
def check_output(path: str) -> Path:
    """The output path: ``.mp4`` or ``.npy``, not a directory."""
    from relay.engine.video import OUTPUT_SUFFIXES

    out = Path(path)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValidationError("output", f"must end in {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}")
    if out.is_dir():
        raise ValidationError("output", f"{path} is a directory")
    return out


def check_stats(path: str | None) -> Path | None:
    """The ``--stats`` path: a ``.json`` file whose folder can be created."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix != ".json" or out.is_dir():
        raise ValidationError("stats", f"must be a .json file, got {path!r}")
    return out


def read_image(path: str | None) -> bytes | None:
    """The ``--image`` file's bytes."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError("image", f"cannot read {path}: {exc.strerror or exc}") from None


def checkpoint_steps(text: str, directory: str | None, steps: int, *, start: int = 0) -> set[int]:
    """The ``--checkpoint-at`` step counts, each strictly between ``start`` and ``steps``."""
    if not text:
        return set()
    if directory is None:
        raise ValidationError("checkpoint_dir", "is required with --checkpoint-at")
    try:
        wanted = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValidationError("checkpoint_at", f"must be comma-separated integers, got {text!r}") from None
    bad = sorted(k for k in wanted if not start < k < steps)
    if bad:
        raise ValidationError("checkpoint_at", f"step counts must be in {start + 1}..{steps - 1}, got {bad}")
    return wanted


def parse_device(text: str | None) -> tuple[str | None, int]:
    """``--device``: ``(type, index)`` with type ``cpu`` or ``cuda`` (``None``: pick later)."""
    if text is None:
        return None, 0
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValidationError("device", f"must be cpu, cuda or cuda:N, got {text!r}")
    return kind, int(index or 0)


def resolve_device_type(executor: str, device_type: str | None) -> str:
    """The device type of the run: ``--device``'s, else CUDA when this machine has it. Local and
    torchrun runs on ``cuda`` need CUDA here (a Ray cluster's GPUs are checked when it is joined).

    Raises:
        ValidationError: ``device``: CUDA asked for on a machine (or a torch build) without it.
    """
    import torch

    if device_type is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and executor != "ray" and not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
        raise ValidationError("device", f"cuda is not available here ({build}, torch {torch.__version__})")
    return device_type


def layout_from_args(args, info, *, needs_uncond: bool | None):
    """The group layout of the parallel flags, checked against the model (fused placement;
    staged groups take ``--high-layout`` / ``--low-layout``)."""
    from relay.parallel.layout import ParallelLayout

    given = [name for name in ("ulysses", "ring", "cfg_parallel", "fsdp") if getattr(args, name) is not None]
    if args.placement == "staged":
        if given or args.layout:
            raise ValidationError("placement", "staged groups take --high-layout / --low-layout, "
                                               "not --ulysses / --ring / --cfg-parallel / --fsdp / --layout")
        return ParallelLayout()
    if args.nproc < 1:
        raise ValidationError("nproc", f"must be at least 1, got {args.nproc}")
    if args.layout:
        if given:
            raise ValidationError("layout", f"--layout replaces {', '.join(flag(n) for n in given)}; give one or the other")
        layout = ParallelLayout.from_spec(args.layout, nproc=args.nproc if args.nproc > 1 else None, field="layout")
    else:
        fsdp = args.fsdp
        layout = ParallelLayout.from_flags(nproc=args.nproc, ulysses=args.ulysses, ring=args.ring,
                                           cfg=args.cfg_parallel, fsdp=True if fsdp == -1 else fsdp)
    layout.check_model(num_heads=info.num_attention_heads, guidance_needs_uncond=needs_uncond,
                       supported=info.spec.parallel, family=info.spec.description)
    if layout.world_size > 1 and args.offload and layout.fsdp_degree == 1:
        raise ValidationError("offload", "in a group offloads FSDP shards: add --fsdp")
    return layout


def attention_from_args(args, placement, info, device_type: str, dtype: str | None) -> str:
    """``--attention`` (else ``$RELAY_ATTENTION``, else ``auto``), checked against what the
    driver knows: ``sdpa`` only where no group splits the sequence (sequence parallelism needs a
    kernel that returns its log-sum-exp), a named kernel only where it takes the device, the
    dtype and the model's head size, and (but for Ray, whose ranks run on other machines) is
    installed. The GPU's architecture and the check on the device are the ranks' part, at load.
    Resolved here so that every rank, on any node, is told the same.

    Raises:
        ValidationError: ``attention``.
    """
    import os

    name = args.attention or os.environ.get("RELAY_ATTENTION") or "auto"
    if name not in ATTENTION_CHOICES:
        raise ValidationError("attention", f"RELAY_ATTENTION={name!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if name == "auto":
        return name
    if name == "sdpa":
        split = [g.name for g in placement.groups if g.layout.sp_degree > 1]
        if split:
            raise ValidationError("attention", f"sdpa serves groups that do not split the sequence; {', '.join(split)} "
                                               "do (Ulysses / ring attention needs a kernel that returns its "
                                               "log-sum-exp): use auto or a kernel")
        return name
    from relay.engine.loader import DTYPES
    from relay.parallel import kernels

    torch_dtype = DTYPES[dtype or ("bf16" if device_type == "cuda" else "fp32")]
    head_dim = info.transformer_config.get("attention_head_dim")
    try:
        kernels.select(device_type, torch_dtype, head_dim, prefer=name, installed=args.executor != "ray")
    except ValueError as exc:
        raise ValidationError("attention", str(exc)) from None
    return name


def scheduler_config(args, **extra):
    """The :class:`engine.tickets.SchedulerConfig` of ``--checkpoint-every``, ``--step-timeout``,
    ``--max-retries``, ``--health-period``, ``--health-timeout`` and ``--rebuild-retry``."""
    from relay.engine.tickets import SchedulerConfig

    for name, value, low in (("checkpoint_every", args.checkpoint_every, 1), ("max_retries", args.max_retries, 0)):
        if value < low:
            raise ValidationError(name, f"must be at least {low}, got {value}")
    if not args.step_timeout > 0:
        raise ValidationError("step_timeout", f"must be positive, got {args.step_timeout}")
    if not args.health_period >= 0 or args.health_period == float("inf"):
        raise ValidationError("health_period", f"must be a number of seconds >= 0, got {args.health_period}")
    if not 0 < args.health_timeout < float("inf"):
        raise ValidationError("health_timeout", f"must be positive, got {args.health_timeout}")
    if not args.rebuild_retry >= 0 or args.rebuild_retry == float("inf"):
        raise ValidationError("rebuild_retry", f"must be a number of seconds >= 0, got {args.rebuild_retry}")
    return SchedulerConfig(checkpoint_every=args.checkpoint_every, step_timeout_s=args.step_timeout,
                           max_request_retries=args.max_retries, health_period_s=args.health_period,
                           health_timeout_s=args.health_timeout, rebuild_retry_s=args.rebuild_retry, **extra)


_RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def parse_ray_resources(text: str | None) -> dict[str, tuple[str, ...]]:
    """``--ray-resources``: ``{group: (name, ...)}``, ``"*"`` for the names given alone."""
    import re

    if not text:
        return {}
    mapping: dict[str, tuple[str, ...]] = {}
    for item in (part.strip() for part in text.split(",")):
        group, sep, name = item.rpartition("=")
        group = group.strip() if sep else "*"
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", name) or (sep and not re.fullmatch(r"[A-Za-z0-9_]+", group)):
            raise ValidationError("ray_resources", f"must be NAME or GROUP=NAME items separated by commas, got {item!r}")
        if name in _RESERVED_RESOURCES:
            raise ValidationError("ray_resources", f"{name} is one of Ray's own resources; name a custom one")
        if "_group_" in name or name.startswith("node:"):  # Ray's placement-group and per-node names
            raise ValidationError("ray_resources", f"{name!r} reads as one of Ray's placement-group or node "
                                                   "resources; name a custom one (ray start --resources)")
        mapping[group] = tuple(dict.fromkeys((*mapping.get(group, ()), name)))
    return mapping


def check_executor(args) -> None:
    """Flags that only one executor takes, and what torchrun cannot do."""
    if args.executor != "ray":
        for name in ("ray_address", "ray_resources"):
            if getattr(args, name, None):
                raise ValidationError(name, "needs --executor ray")
    parse_ray_resources(getattr(args, "ray_resources", None))
    if args.executor == "torchrun" and (args.placement != "fused" or args.replicas != 1):
        raise ValidationError("executor", "torchrun runs one group: --placement staged and --replicas "
                                          "need --executor local or ray")


def check_placement_flags(args, info, layout) -> None:
    """Every placement flag that can be checked without the model's step schedule."""
    from relay.launch.placement import check_placement

    if getattr(args, "vae_parallel", False) and "vae_parallel" not in info.spec.parallel:
        raise ValidationError("vae_parallel", f"is not available for {info.spec.description} yet")
    if getattr(args, "vae_parallel", False) and args.nproc < 2:
        raise ValidationError("vae_parallel", "splits the decode over a group's ranks: it needs --nproc 2 or more")
    if getattr(args, "vae_parallel", False) and getattr(args, "vae_tiling", False):
        raise ValidationError("vae_tiling", "cannot be combined with --vae-parallel (tiles blend; the row split is "
                                            "exact and already bounds each rank's memory)")
    check_placement(info, placement=args.placement, layout=layout, replicas=args.replicas,
                    devices=args.nproc if args.nproc > 1 else None, stage_split=args.stage_split,
                    high_layout=args.high_layout, low_layout=args.low_layout, encode_on=args.encode_on,
                    decode_on=args.decode_on)


def placement_from_args(args, info, resolved, layout):
    """The validated :class:`launch.placement.Placement` of the executor flags (a staged split
    reads the model's scheduler, so diffusers is imported)."""
    from relay.launch.placement import plan_groups

    placement = plan_groups(info, resolved, placement=args.placement, layout=layout, replicas=args.replicas,
                            devices=args.nproc if args.nproc > 1 else None, stage_split=args.stage_split,
                            high_layout=args.high_layout, low_layout=args.low_layout, encode_on=args.encode_on,
                            decode_on=args.decode_on)
    names = [group.name for group in placement.groups]
    unknown = sorted(set(parse_ray_resources(getattr(args, "ray_resources", None))) - {"*", *names})
    if unknown:
        raise ValidationError("ray_resources", f"no group {', '.join(unknown)} in this placement (groups: "
                                               f"{', '.join(names)})")
    return placement


def common_checks(args):
    """The checks ``generate`` and ``resume`` share: ``(output, stats path, device type, device
    index, scheduler config, model info)``."""
    output = check_output(args.output)
    stats = check_stats(args.stats)
    device_type, device_index = parse_device(args.device)
    check_executor(args)
    return output, stats, device_type, device_index, scheduler_config(args), model_info(args.model)


def model_info(model: str | None):
    """The ``--model`` folder's :class:`~engine.model_info.ModelInfo` (default: the tiny T2V)."""
    from relay.engine.model_info import read_model_info
    from relay.engine.tiny import default_model_dir

    return read_model_info(model if model else default_model_dir("t2v"))
