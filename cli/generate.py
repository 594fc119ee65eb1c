"""``relay generate``, ``relay resume`` and ``relay make-tiny``.

Both generation commands run the same way on every executor: check every flag (no torch,
diffusers or Ray yet), check the prompt against the tokenizer, plan the groups, build an
:class:`~launch.executor.Executor` (or write a torchrun job and re-run under torchrun) and hand
the request to :func:`drive`, which submits it to the executor's stage scheduler, shows
progress, writes snapshots, the output and the run stats.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from relay.cli.flags import (
    EXIT_FAILED,
    EXIT_OK,
    attention_from_args,
    check_placement_flags,
    checkpoint_steps,
    common_checks,
    fail,
    flag,
    layout_from_args,
    lora_refs,
    parse_ray_resources,
    parse_timesteps,
    placement_from_args,
    read_image,
    refuse,
    resolve_device_type,
    say,
)
from relay.engine.errors import ModelError, ValidationError


@dataclass(frozen=True, kw_only=True)
class GenerateRun:
    """One request for :func:`drive` (picklable: it travels in a torchrun job).

    Attributes:
        request: ``ResolvedRequest.to_dict(with_image=True)``.
        experts: The expert of each step.
        output: Output file.
        fps: Frames per second of an mp4.
        state: A :class:`~engine.state.DenoiseState` to finish (``relay resume``), or ``None``.
        checkpoint_dir: Where snapshots go, if anywhere.
        checkpoint_at: Step counts after which to write one.
        stats: Where the run stats go, if anywhere.
        model: Facts about the model for the stats (path, family, kind).
        quiet: No progress output.
    """

    request: dict
    experts: list
    output: str
    fps: int
    state: object = None
    checkpoint_dir: str | None = None
    checkpoint_at: tuple[int, ...] = ()
    stats: str | None = None
    model: dict = field(default_factory=dict)
    quiet: bool = False


# --- the one driver --------------------------------------------------------------------------------
def drive(executor, run: GenerateRun) -> int:
    """Runs ``run`` through ``executor``'s scheduler; writes snapshots, the output and the stats.

    Returns:
        The exit code: 0, or 1 when the request failed (the message is printed).
    """
    from relay.cli.progress import StepProgress
    from relay.engine.tickets import RequestFailed
    from relay.engine.video import write_output

    start = run.state.step_index if run.state is not None else 0
    bar = StepProgress(len(run.experts), start=start, enabled=not run.quiet, desc="denoise")
    folder = Path(run.checkpoint_dir) if run.checkpoint_dir else None

    def on_event(kind: str, data: dict) -> None:
        if kind == "progress":
            bar.update(data["step"], expert=data["expert"], eta_s=data["eta_s"], group=data["group"])
        elif kind == "checkpoint" and folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            data["state"].save(folder / f"step-{data['step']:04d}.pt")
        elif kind == "retry" and not run.quiet:
            bar.write(f"group {data['group']} failed ({data.get('error', '')}); rebuilt, resuming from the "
                      "last checkpoint")
        elif kind == "decoding":
            bar.close()

    try:
        ticket = executor.scheduler.submit(run.request, experts=run.experts, state=run.state,
                                           checkpoint_at=run.checkpoint_at, on_event=on_event)
        clip = ticket.clip()
    except RequestFailed as exc:
        bar.close()
        print(f"relay generate: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
    stats = ticket.stats.to_dict()
    say(run.quiet, f"denoised {sum(e['steps'] for e in stats['experts'].values())} step(s); decoded "
                   f"{clip.frames.shape[0]} frames{' with sound' if clip.audio is not None else ''} on "
                   f"{stats['decode'].get('ranks', 1)} rank(s) in "
                   f"{stats['seconds'].get('decode', 0.0):.1f}s")
    write_output(clip, Path(run.output), fps=run.fps)
    say(run.quiet, f"wrote {run.output}")
    if ticket.attempts:
        say(run.quiet, f"recovered from {ticket.attempts} group failure(s)")
    if run.stats:
        path = Path(run.stats)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**stats, "model": run.model}, indent=2, default=str) + "\n")
        say(run.quiet, f"wrote run stats {path}")
    return EXIT_OK


# --- relay generate / relay resume -----------------------------------------------------------------
def generate(args: argparse.Namespace) -> int:
    """``relay generate``: check, plan, run on the chosen executor, write."""
    from relay.engine.request import GenerationRequest, resolve_request

    try:
        output, stats, device_type, device_index, config, info = common_checks(args)
        request = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
            width=args.width, frames=args.frames, steps=args.steps, seed=args.seed,
            guidance=args.guidance, guidance_low=args.guidance_low, shift=args.shift,
            boundary=args.boundary, fps=args.fps, image=read_image(args.image), solver=args.solver,
            timesteps=parse_timesteps(args.timesteps), preset=args.preset, loras=lora_refs(args),
            cache=args.cache, cache_high=args.cache_high, cache_low=args.cache_low,
            guidance_terms=args.guidance_terms,
        )
        # Every field, before any library is imported (LoRA files, when given, are read and
        # checked against the experts' configs on the meta device here).
        resolved = resolve_request(request, info)
        checkpoints = checkpoint_steps(args.checkpoint_at, args.checkpoint_dir, resolved.steps)
        layout = layout_from_args(args, info, needs_uncond=_needs_uncond(resolved))
        check_placement_flags(args, info, layout)
        from relay.engine.loader import load_tokenizer  # every flag checked: the prompt's length now
        from relay.engine.request import check_prompts

        check_prompts(resolved, info, load_tokenizer(info))
    except (ValidationError, ModelError) as exc:
        return refuse("generate", exc)
    _show_settings(args.quiet, info, resolved)
    run = GenerateRun(request=resolved.to_dict(with_image=True), experts=[], output=str(output),
                      fps=resolved.fps, checkpoint_dir=args.checkpoint_dir,
                      checkpoint_at=tuple(sorted(checkpoints)), stats=str(stats) if stats else None,
                      model=_model_facts(info), quiet=args.quiet)
    return _run(args, "generate", info, resolved, layout, config, run, device_type, device_index)


def resume(args: argparse.Namespace) -> int:
    """``relay resume``: finish a snapshot on any executor."""
    from relay.engine.request import ResolvedRequest

    try:
        output, stats, device_type, device_index, config, info = common_checks(args)
        layout = layout_from_args(args, info, needs_uncond=None)
        check_placement_flags(args, info, layout)
        from relay.engine.state import DenoiseState  # torch: every flag has been checked

        try:
            state = DenoiseState.load(args.state)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ValidationError("state", f"cannot read snapshot {args.state}: {exc}") from None
        resolved = ResolvedRequest(**{**state.request, "sources": state.request.get("sources") or {}})
        from relay.engine.experts import DENSE, HIGH, LOW

        has = (HIGH, LOW) if info.is_moe else (DENSE,)
        needed = sorted(set(state.experts[state.step_index:]) - set(has))
        if needed:
            raise ValidationError("model", f"the snapshot's steps run the {', '.join(needed)} expert(s); {info.path} "
                                           f"({info.family} {info.kind}) has {', '.join(has)}: resume it with the "
                                           "--model it was made with")
    except (ValidationError, ModelError) as exc:
        return refuse("resume", exc)
    if state.done:
        return fail("resume", f"--state: snapshot {args.state} has every step done")
    say(args.quiet, f"resuming at step {state.step_index}/{state.num_steps}")
    run = GenerateRun(request=state.request, experts=list(state.experts), output=str(output),
                      fps=int(state.request["fps"]), state=state, stats=str(stats) if stats else None,
                      model=_model_facts(info), quiet=args.quiet)
    return _run(args, "resume", info, resolved, layout, config, run, device_type, device_index)


def _run(args, command, info, resolved, layout, config, run: GenerateRun, device_type, device_index) -> int:
    """The part every executor shares: device checks, placement, the schedule, the executor."""
    from relay.engine.stages import request_experts

    try:
        device_type = resolve_device_type(args.executor, device_type)
        local = args.executor in ("local", "torchrun")
        placement = placement_from_args(args, info, resolved, layout)
        attention = attention_from_args(args, placement, info, device_type, args.dtype)
        if local and device_type == "cuda":
            import torch

            have = torch.cuda.device_count()
            if device_index + placement.devices > have:
                raise ValidationError("nproc", f"the placement needs {placement.devices} GPU(s) from "
                                               f"cuda:{device_index}; this machine has {have}")
        experts = request_experts(info, resolved)
        if run.state is not None and list(run.state.experts) != experts:
            raise ValidationError("state", "the snapshot's expert schedule does not match this model's "
                                           f"({run.state.experts} vs {experts})")
    except ValidationError as exc:
        return refuse(command, exc)
    run = replace(run, experts=experts)
    _show_placement(args.quiet, placement)
    from relay.launch.worker import WorkerSpec

    spec = WorkerSpec(model=str(info.path), layout=layout, dtype=args.dtype, device_type=device_type,
                      text_encoder=args.text_encoder, offload=args.offload,
                      vae_parallel=args.vae_parallel, vae_tiling=args.vae_tiling, attention=attention)
    if args.executor == "torchrun":
        return run_under_torchrun(placement, spec, config, "relay.cli.generate:drive", run)
    from relay.launch.executor import Executor, backend_for

    backend = backend_for(args.executor, placement)
    from relay.engine.tickets import GroupFailure

    try:
        executor = Executor(placement, spec, backend=backend, config=config, ray_address=args.ray_address,
                            ray_strategy=args.ray_strategy, ray_resources=parse_ray_resources(args.ray_resources),
                            device_offset=device_index)
    except (ValidationError, ModelError) as exc:
        return refuse(command, exc)
    except GroupFailure as exc:
        return fail(command, str(exc), EXIT_FAILED)
    with executor:
        return drive(executor, run)


def run_under_torchrun(placement, spec, config, driver: str, payload) -> int:
    """Writes a :class:`~launch.torchrun.TorchrunJob` and runs it under ``torchrun --standalone``
    with one rank per device of the placement's group; returns torchrun's exit code."""
    from relay.launch.torchrun import TorchrunJob

    nproc = placement.groups[0].devices
    folder = Path(tempfile.mkdtemp(prefix="relay-torchrun-"))
    try:
        job = folder / "job.pkl"
        TorchrunJob(placement=placement, spec=spec, config=config, driver=driver, payload=payload,
                    pid_file=str(folder / "rank0.pid")).save(job)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "relay.launch.torchrun", str(job)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen(command, env=env)

        def forward(signum, frame) -> None:
            # To rank 0, the driver: a service drains and closes the group, the followers exit,
            # and torchrun ends cleanly. Before rank 0 runs, to torchrun (which stops the ranks).
            try:
                os.kill(int((folder / "rank0.pid").read_text()), signum)
            except (OSError, ValueError):
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _needs_uncond(resolved) -> bool:
    """Whether some step runs more than one branch forward (a family's guidance terms, LTX-2's,
    add branches of their own)."""
    return resolved.guidance > 1 or (resolved.guidance_low or 0) > 1 or bool(resolved.guidance_terms)


def _model_facts(info) -> dict:
    return {"path": str(info.path), "family": info.family, "kind": info.kind}


_SHOWN = ("width", "height", "frames", "steps", "seed", "guidance", "guidance_low", "shift", "boundary", "fps",
          "solver", "timesteps")


def _show_settings(quiet: bool, info, resolved) -> None:
    """The resolved settings and where each came from (``--flag`` for what was given)."""
    say(quiet, f"model {info.path} ({info.family} {info.kind}); {resolved.width}x{resolved.height}, "
               f"{resolved.frames} frames, {resolved.steps} steps, seed {resolved.seed}")
    lines = []
    for name in _SHOWN:
        value = getattr(resolved, name)
        if value is None:
            continue
        source = resolved.sources.get(name, "")
        if name == "timesteps":
            value = ",".join(f"{t:g}" for t in value)
        elif isinstance(value, float) and len(repr(value)) > 10:  # a computed shift: 1.7971425236824654
            value = f"{value:.6g}"
        lines.append(f"  {name:<13} {value!s:<10} {flag(name) if source == 'request' else source}")
    if resolved.guidance_terms:
        from relay.engine.request import guidance_terms_text

        terms = guidance_terms_text(resolved.guidance_terms)
        source = resolved.sources.get("guidance_terms", "")
        lines.append(f"  guidance_terms {terms} ({flag('guidance_terms') if source == 'request' else source})")
    for lora in resolved.loras:
        lines.append(f"  lora          {lora.name} x{lora.scale:g} on {', '.join(lora.experts)} ({lora.format} layout)")
    say(quiet, "settings (source):\n" + "\n".join(lines))


def _show_placement(quiet: bool, placement) -> None:
    if placement.kind == "fused" and len(placement.groups) == 1:
        say(quiet, f"layout {placement.groups[0].layout.describe()}")
        return
    say(quiet, f"placement {placement.kind}: {placement.reason}")
    for plan in placement.groups:
        say(quiet, f"  group {plan.name}: {'+'.join(plan.roles)} on {plan.layout.describe()}")


def make_tiny(args: argparse.Namespace) -> int:
    """``relay make-tiny``: write a tiny random model."""
    from relay.engine.tiny import make_tiny as build

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.kind == "ltx2":
        print(build(args.directory, kind="ti2v", seed=args.seed, family="ltx2"))
    else:
        print(build(args.directory, kind=args.kind, seed=args.seed))
    return EXIT_OK
