"""``relay generate --executor ray|torchrun``: one generation on Ray worker groups, or re-launched
under torchrun. Validation has already happened (:func:`launch.commands.generate`); placement
flags are checked here before Ray starts, so they exit 2 too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from relay.engine.errors import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def scheduler_config(args, **extra):
    """The :class:`engine.scheduler.SchedulerConfig` of the ``--checkpoint-every``,
    ``--step-timeout`` and ``--max-retries`` flags.

    Raises:
        ValidationError: naming the flag at fault.
    """
    from relay.engine.scheduler import SchedulerConfig

    for flag, value, low in (("checkpoint_every", args.checkpoint_every, 1), ("max_retries", args.max_retries, 0)):
        if value < low:
            raise ValidationError(flag, f"must be at least {low}, got {value}")
    if not args.step_timeout > 0:
        raise ValidationError("step_timeout", f"must be positive, got {args.step_timeout}")
    return SchedulerConfig(checkpoint_every=args.checkpoint_every, step_timeout_s=args.step_timeout,
                           max_request_retries=args.max_retries, **extra)


def placement_from_args(args, info, resolved, layout):
    """The validated :class:`launch.placement.Placement` of the executor flags."""
    from relay.launch.placement import plan_groups

    return plan_groups(info, resolved, placement=args.placement, layout=layout, replicas=args.replicas,
                       devices=args.nproc if args.nproc > 1 else None, stage_split=args.stage_split, high_layout=args.high_layout,
                       low_layout=args.low_layout, encode_on=args.encode_on, decode_on=args.decode_on)


def generate_on_ray(args, info, resolved, layout, output, checkpoints) -> int:
    """Runs one request through the stage scheduler on Ray worker groups and writes the output."""
    from relay.engine.scheduler import RequestFailed
    from relay.engine.stages import request_experts
    from relay.engine.video import write_output
    from relay.launch.commands import _device_type, _fail, _flag
    from relay.launch.ray_executor import RayExecutor, connect, shutdown
    from relay.launch.worker import WorkerSpec

    try:
        placement = placement_from_args(args, info, resolved, layout)
    except ValidationError as exc:
        return _fail("generate", f"{_flag(exc.field)}: {exc.message}")
    device_type = _device_type(args)
    import ray

    started_here = connect(args.ray_address)
    try:
        if device_type == "cuda":
            have = int(ray.cluster_resources().get("GPU", 0))
            if have < placement.devices:
                return _fail("generate", f"--nproc: the placement needs {placement.devices} GPUs, "
                                         f"the Ray cluster has {have}")
        _say(args.quiet, f"placement {placement.kind}: {placement.reason}")
        for plan in placement.groups:
            _say(args.quiet, f"  group {plan.name}: {'+'.join(plan.roles)} on {plan.layout.describe()}")
        spec = WorkerSpec(model=str(info.path), layout=layout, dtype=args.dtype, device_type=device_type,
                          text_encoder=args.text_encoder, offload=args.offload)
        config = scheduler_config(args)
        began = time.perf_counter()
        with RayExecutor(placement, spec, config=config, address=args.ray_address,
                         strategy=args.ray_strategy) as executor:
            _say(args.quiet, f"{len(placement.groups)} group(s) ready in {time.perf_counter() - began:.1f}s")
            frames = _run_one(executor, resolved, request_experts(info, resolved), args, checkpoints)
            restarts = sum(executor.scheduler.restarts.values())
        if restarts:
            _say(args.quiet, f"recovered from {restarts} group restart(s)")
        write_output(frames, output, fps=resolved.fps)
        _say(args.quiet, f"wrote {output}")
        return EXIT_OK
    except RequestFailed as exc:
        print(f"relay generate: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if started_here:
            shutdown()


def _run_one(executor, resolved, experts, args, checkpoints):
    from pathlib import Path

    from relay.launch.progress import StepProgress

    bar = StepProgress(resolved.steps, enabled=not args.quiet, desc="denoise (ray)")
    holder = {}

    def on_event(kind: str, data: dict) -> None:
        if kind == "progress":
            bar(_Event(data))
            if data["step"] in checkpoints and holder["ticket"].state is not None:
                folder = Path(args.checkpoint_dir)
                folder.mkdir(parents=True, exist_ok=True)
                holder["ticket"].state.save(folder / f"step-{data['step']:04d}.pt")
        elif kind == "retry":
            bar.bar.write(f"group {data['group']} failed ({data.get('error', '')}); rebuilt, resuming from the "
                          "last checkpoint")

    try:
        holder["ticket"] = ticket = executor.scheduler.submit(
            resolved.to_dict(with_image=True), experts=experts, on_event=on_event)
        return ticket.result()
    finally:
        bar.close()


class _Event:
    """Adapts a progress event dict to what :class:`launch.progress.StepProgress` reads."""

    def __init__(self, data: dict) -> None:
        self.expert, self.timestep, self.eta = data["expert"], data["timestep"], data["eta_s"]


def generate_under_torchrun(args) -> int:
    """Re-runs this ``relay generate`` under ``torchrun --standalone`` with ``--nproc`` ranks."""
    # torchrun supplies the world size (launch.torchrun sets --nproc from it); its own parser
    # would also take --nproc for an abbreviation of --nproc-per-node.
    argv = _strip_flag(_strip_flag(args.argv, "--executor"), "--nproc")
    if argv and argv[0] == "generate":
        argv = argv[1:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "relay.launch.torchrun", "generate", *argv]
    if shutil.which(sys.executable) is None:
        raise RuntimeError(f"cannot find the Python interpreter {sys.executable}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(command, env=env)


def _strip_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == flag:
            skip = True
            continue
        if item.startswith(flag + "="):
            continue
        out.append(item)
    return out


def serve_runner_factory(args, model_dirs: list[str]):
    """``relay serve --executor ray``: validates the placement of every model now (exit 2 on a
    bad flag, before Ray starts) and returns the factory that builds each model's worker groups.

    Raises:
        ValidationError: naming the flag at fault.
    """
    from relay.engine.loader import load_tokenizer
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.launch.commands import _device_type
    from relay.parallel.layout import ParallelLayout

    config = scheduler_config(args, max_queue=args.max_queue + 1)
    layout = ParallelLayout.from_spec(args.layout, field="layout") if args.layout else ParallelLayout()
    plans = {}
    for directory in model_dirs:
        info = read_model_info(directory)
        # Stage sizing uses the model's reference settings (a request may differ; the split stays).
        reference = resolve_request(GenerationRequest(prompt="reference"), info)
        plans[str(info.path)] = placement_from_args(args, info, reference, layout)
    device_type = _device_type(args)

    def factory(info, name):
        from relay.engine.scheduled import ScheduledRunner
        from relay.launch.ray_executor import RayExecutor
        from relay.launch.worker import WorkerSpec

        placement = plans[str(info.path)]
        print(f"relay serve: {name}: {placement.kind} placement, {placement.reason}", file=sys.stderr, flush=True)
        spec = WorkerSpec(model=str(info.path), layout=layout, dtype=args.dtype, device_type=device_type,
                          offload=args.offload)
        executor = RayExecutor(placement, spec, config=config, address=args.ray_address, strategy=args.ray_strategy)
        runner = ScheduledRunner(executor.scheduler, info, name=name, tokenizer=load_tokenizer(info))
        runner.close = executor.close
        return runner

    return factory
