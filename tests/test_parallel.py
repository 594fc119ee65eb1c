"""Multi-process parity: a worker group (gloo, fp32, CPU) produces the single-process video.

Every case spawns real processes through the same executor as ``relay generate --nproc N``
(the ``mp`` backend under the stage scheduler); the reference is a plain single-process run of
the engine (itself checked bit-exact against diffusers' pipelines in test_parity.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from relay.parallel.layout import LayoutError, ParallelLayout

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
GROUP_TIMEOUT_S = 300

# 6 steps at shift 5 cross the expert boundary after step 3 (test_parity checks the schedule).
BASE = dict(prompt="a fox in the snow", negative_prompt="blurry", steps=6, seed=3, guidance=4.0,
            shift=5.0)
MOE = dict(BASE, guidance_low=3.0)
#  name: (model kind, layout kwargs, size/frames, extra job fields)
CASES = {
    "ulysses2": ("t2v", dict(ulysses_degree=2), dict(height=32, width=48, frames=5), {}),
    "ulysses2-odd-tokens": ("t2v", dict(ulysses_degree=2), dict(height=48, width=48, frames=1), {}),
    "ring2-odd-tokens": ("t2v", dict(ring_degree=2), dict(height=48, width=48, frames=1), {}),
    "ring2-fsdp2": ("t2v", dict(ring_degree=2, fsdp_degree=2), dict(height=32, width=48, frames=5), {}),
    "cfg2": ("t2v", dict(cfg_degree=2), dict(height=32, width=48, frames=5), {}),
    "ulysses2-ring2-padded": ("t2v", dict(ulysses_degree=2, ring_degree=2),
                              dict(height=48, width=48, frames=5), {}),
    "ulysses2-ring2-fsdp4-text-fsdp": ("t2v", dict(ulysses_degree=2, ring_degree=2, fsdp_degree=4),
                                       dict(height=32, width=48, frames=5), {"text_encoder": "fsdp"}),
    "cfg2-ulysses2-fsdp2": ("t2v", dict(cfg_degree=2, ulysses_degree=2, fsdp_degree=2),
                            dict(height=32, width=48, frames=5), {}),
    "ulysses2-fsdp2-cpu-offload": ("t2v", dict(ulysses_degree=2, fsdp_degree=2),
                                   dict(height=32, width=48, frames=5), {"offload": True}),
    "i2v-ring2": ("i2v", dict(ring_degree=2), dict(height=32, width=48, frames=5), {"image": True}),
    "ti2v-ulysses2-per-token-timesteps": ("ti2v", dict(ulysses_degree=2),
                                          dict(height=64, width=96, frames=5), {}),
    # 3 tokens (1 latent frame x 1 x 3) over 2 ranks: padded, with per-token timesteps split too.
    "ti2v-ulysses2-padded": ("ti2v", dict(ulysses_degree=2), dict(height=32, width=96, frames=1), {}),
    # 9 tokens over a ring of 2, with the image condition concatenated on the channels.
    "i2v-ring2-padded": ("i2v", dict(ring_degree=2), dict(height=48, width=48, frames=1), {"image": True}),
    "ulysses2-text-encoder-cpu": ("t2v", dict(ulysses_degree=2), dict(height=32, width=48, frames=5),
                                  {"text_encoder": "cpu"}),
}


def _run_group_command(args: list[str], env: dict | None = None) -> tuple[int, str]:
    """Runs a launcher command in its own session; on timeout the whole process group is killed
    (its worker ranks included), so a hung group never outlives the test."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        _, err = proc.communicate(timeout=GROUP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def _settings(kind, size):
    return dict(MOE if kind != "ti2v" else BASE, **size)


@pytest.fixture(scope="module")
def engines(tiny_models):
    from relay.engine import Engine, load_model

    return {kind: Engine(load_model(path, dtype="fp32", device="cpu")) for kind, path in tiny_models.items()}


def _run_on_processes(model_dir, resolved, layout, **spec_fields):
    """One request on a local-process group (the ``mp`` backend of ``relay generate --nproc``);
    returns the frames, the run stats, each rank's pid and parameter bytes per expert."""
    from relay.engine.model_info import read_model_info
    from relay.engine.stages import request_experts
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec

    info = read_model_info(model_dir)
    spec = WorkerSpec(model=str(model_dir), layout=layout, dtype="fp32", device_type="cpu", **spec_fields)
    with Executor(plan_groups(info, resolved, layout=layout), spec, backend="mp",
                  build_timeout_s=GROUP_TIMEOUT_S) as executor:
        ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(info, resolved))
        frames = ticket.result(timeout=GROUP_TIMEOUT_S)
        group = executor.groups[0]
        pids, shares = group.ping(), group.call("parameter_bytes", timeout_s=60)
    return frames, ticket.stats.to_dict(), pids, shares


@pytest.mark.parametrize("case", list(CASES))
def test_group_output_equals_single_process(case, tiny_models, engines, png_bytes):
    from relay.engine import GenerationRequest

    kind, layout_kwargs, size, extra = CASES[case]
    extra = dict(extra)
    image = png_bytes if extra.pop("image", False) else None
    engine = engines[kind]
    resolved = engine.resolve(GenerationRequest(image=image, **_settings(kind, size)))
    reference = engine.generate(resolved)
    layout = ParallelLayout(**layout_kwargs)
    layout.check_model(num_heads=engine.info.num_attention_heads)
    ours, stats, pids, shares = _run_on_processes(tiny_models[kind], resolved, layout, **extra)
    assert len(set(pids)) == layout.world_size  # one process per rank
    assert [m["rank"] for m in stats["memory"]["fused0"]] == list(range(layout.world_size))
    assert stats["layout"]["groups"][0]["attention"] == ("cpu-flash" if layout.sp_degree > 1 else "sdpa")
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)
    if layout.fsdp_degree > 1:  # each rank holds about 1/fsdp of every expert
        full = sum(p.numel() * p.element_size() for p in engine.model.experts["high_noise"].parameters())
        for share in shares:
            assert abs(share["high_noise"] / full - 1 / layout.fsdp_degree) < 0.05, share


def test_token_counts_of_the_padded_cases_do_not_divide():
    """Guards the padding cases: their token counts really are not multiples of the degree."""
    for name in ("ulysses2-odd-tokens", "ring2-odd-tokens", "ulysses2-ring2-padded", "ti2v-ulysses2-padded",
                 "i2v-ring2-padded"):
        kind, layout_kwargs, size, _ = CASES[name]
        layout = ParallelLayout(**layout_kwargs)
        stride = 32 if kind == "ti2v" else 16  # VAE x patch
        tokens = ((size["frames"] - 1) // 4 + 1) * (size["height"] // stride) * (size["width"] // stride)
        assert tokens % layout.sp_degree, name


@pytest.mark.parametrize("flags,field", [
    (["--nproc", "2", "--ulysses", "3"], "--ulysses"),
    (["--nproc", "4", "--ulysses", "3"], "--ulysses"),
    (["--nproc", "2", "--ring", "4"], "--ring"),
    (["--nproc", "3", "--cfg-parallel", "2"], "--nproc"),
    (["--nproc", "2", "--fsdp", "3"], "--fsdp"),
    (["--nproc", "2", "--offload"], "--offload"),
    (["--nproc", "2", "--cfg-parallel", "2", "--guidance", "1", "--guidance-low", "1"], "--cfg-parallel"),
])
def test_bad_layout_flags_exit_2_before_spawning(flags, field, tiny_models, relay, tmp_path):
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", "x", "--output",
                   tmp_path / "x.npy", "--device", "cpu", *flags)
    assert result.code == 2, result.err
    assert f"error: {field}:" in result.err


# --- layout validation at cluster sizes, no processes -------------------------------------------

@pytest.mark.parametrize("world,cfg,ulysses,ring,fsdp", [
    (8, 1, 8, 1, 8), (8, 2, 4, 1, 4), (8, 2, 4, 1, 8), (8, 1, 4, 2, 1), (8, 2, 2, 2, 4),
    (16, 2, 8, 1, 8), (16, 2, 4, 2, 16), (16, 1, 8, 2, 16), (16, 1, 4, 4, 1),
])
def test_valid_layouts_at_8_and_16(world, cfg, ulysses, ring, fsdp):
    layout = ParallelLayout(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring, fsdp_degree=fsdp)
    layout.check_world(world)
    layout.check_model(num_heads=40)
    assert layout.world_size == world and layout.mesh_shape == (cfg, ring, ulysses)


@pytest.mark.parametrize("kwargs,world,heads,field", [
    (dict(ulysses_degree=8), 16, 40, "nproc"),                 # product != world
    (dict(ulysses_degree=16), 16, 40, "ulysses"),              # 16 does not divide 40 heads
    (dict(ulysses_degree=16), 16, 24, "ulysses"),              # nor TI2V-5B's 24
    (dict(cfg_degree=2, ulysses_degree=8, fsdp_degree=4), 16, 40, "fsdp"),
    (dict(cfg_degree=4, ulysses_degree=2), 8, 40, "cfg_parallel"),
    (dict(ulysses_degree=4, ring_degree=2, fsdp_degree=2), 8, 40, "fsdp"),
    (dict(ulysses_degree=0), 8, 40, "ulysses"),
])
def test_invalid_layouts_at_8_and_16(kwargs, world, heads, field):
    with pytest.raises(LayoutError) as caught:
        layout = ParallelLayout(**kwargs)
        layout.check_world(world)
        layout.check_model(num_heads=heads)
    assert caught.value.field == field


def test_from_flags_fills_the_sequence_degrees():
    assert ParallelLayout.from_flags(nproc=8, cfg=2) == ParallelLayout(cfg_degree=2, ulysses_degree=4)
    assert ParallelLayout.from_flags(nproc=16, ring=2, fsdp=True) == ParallelLayout(
        ulysses_degree=8, ring_degree=2, fsdp_degree=16)
    with pytest.raises(LayoutError):
        ParallelLayout.from_flags(nproc=8, ulysses=3)


# sitecustomize runs in every interpreter on PYTHONPATH. In a torchrun rank (RANK is set) any
# argparse parse is an error (the driver and torchrun itself may parse). At exit, every process
# writes how many gloo threads it still has: a process group left to interpreter teardown can
# abort a rank that finished its job (SIGABRT, "terminate called without an active exception").
RANK_GUARD = """
import atexit, os
if 'RANK' in os.environ:
    import argparse
    def refuse(self, *args, **kwargs):
        raise SystemExit('a torchrun rank parsed argv with argparse')
    argparse.ArgumentParser.parse_known_args = refuse
_probe = os.environ.get('RELAY_TEST_EXIT_PROBE')
if _probe:
    def _report():  # registered first, so it runs after every other exit handler
        names = []
        for task in os.listdir('/proc/self/task'):
            try:
                with open(f'/proc/self/task/{task}/comm') as comm:
                    names.append(comm.read().strip())
            except OSError:
                pass
        with open(os.path.join(_probe, f'{os.getpid()}.txt'), 'w') as out:
            out.write(str(names.count('pt_gloo_runloop')))
    atexit.register(_report)
"""


@pytest.mark.parametrize("executor", ["torchrun", "local"])
def test_rank_processes_never_parse_argv_and_leave_no_process_group(executor, tiny_models, engines, tmp_path):
    """`relay generate --executor torchrun` (and the spawned ranks of ``local``): the ranks read
    the job the driver wrote (a torchrun rank that re-parses argv fails the run), the video
    equals one process's, and every process exits with no gloo thread left for interpreter
    teardown to tear down."""
    from relay.engine import GenerationRequest

    size = dict(height=32, width=48, frames=5)
    reference = engines["t2v"].generate(GenerationRequest(**_settings("t2v", size)))
    guard, probe = tmp_path / "guard", tmp_path / "exits"
    guard.mkdir()
    probe.mkdir()
    (guard / "sitecustomize.py").write_text(RANK_GUARD)
    out = tmp_path / "out.npy"
    args = [sys.executable, "-m", "relay.cli", "generate", "--model", str(tiny_models["t2v"]),
            "--executor", executor, "--nproc", "2", "--cfg-parallel", "2", "--dtype", "fp32",
            "--device", "cpu", "--output", str(out)]
    for key, value in _settings("t2v", size).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, RELAY_TEST_EXIT_PROBE=str(probe),
               PYTHONPATH=os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])))
    code, err = _run_group_command(args, env=env)
    assert code == 0, err
    np.testing.assert_allclose(np.load(out), reference, atol=TOLERANCE, rtol=0)
    exits = {path.stem: int(path.read_text()) for path in probe.glob("*.txt")}
    assert len(exits) >= 3, exits  # the driver and both ranks (torchrun's agent too)
    assert not any(exits.values()), f"processes left gloo threads to interpreter teardown: {exits}"
