"""One runtime: every executor drives the same stage scheduler and gives the same frames.

Each case is ``relay generate`` end to end on one executor -- in this process, on spawned local
processes (fused and staged), under torchrun, on Ray actors (fused and staged) -- compared with a
plain single-process run of the engine (itself equal to diffusers' pipeline, test_parity.py).
The run stats file proves which backend ran it and that the scheduler recorded it the same way
everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

SETTINGS = dict(prompt="a paper boat on a stream", height=32, width=32, frames=5, steps=6, seed=11,
                guidance=4.0, guidance_low=3.0, shift=5.0)
#: name: (extra flags, backend, groups as (name, ranks), tolerance)
CASES = {
    "inprocess": ([], "inprocess", [("fused0", 1)], 1e-5),
    "mp-ulysses2": (["--nproc", 2, "--ulysses", 2], "mp", [("fused0", 2)], 1e-4),
    "mp-staged": (["--placement", "staged", "--stage-split", "1:1"], "mp", [("high", 1), ("low", 1)], 1e-5),
    "torchrun-cfg2": (["--executor", "torchrun", "--nproc", 2, "--cfg-parallel", 2], "torchrun",
                      [("fused0", 2)], 1e-4),
    "ray-fused": (["--executor", "ray"], "ray", [("fused0", 1)], 1e-5),
    "ray-staged": (["--executor", "ray", "--placement", "staged", "--stage-split", "1:1"], "ray",
                   [("high", 1), ("low", 1)], 1e-5),
}


def _flags(settings: dict) -> list:
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", value]
    return out


@pytest.fixture(scope="module")
def reference(tiny_models):
    from relay.engine import Engine, GenerationRequest, load_model

    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    return engine.generate(GenerationRequest(**SETTINGS))


@pytest.mark.parametrize("case", list(CASES))
def test_every_executor_runs_the_same_scheduler_and_frames(case, tiny_models, reference, relay, tmp_path):
    flags, backend, groups, tolerance = CASES[case]
    out, stats_path = tmp_path / "x.npy", tmp_path / "stats.json"
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--dtype", "fp32",
                   "--device", "cpu", "--output", out, "--stats", stats_path, *flags)
    assert result.code == 0, result.err
    frames = np.load(out)
    assert frames.shape == reference.shape
    np.testing.assert_allclose(frames, reference, atol=tolerance, rtol=0)
    stats = json.loads(stats_path.read_text())
    layout = stats["layout"]
    assert layout["executor"] == backend
    assert [(g["name"], g["ranks"]) for g in layout["groups"]] == groups
    assert {g["backend"] for g in layout["groups"]} == {backend}
    # The scheduler recorded the request the same way on every backend.
    assert {name: e["steps"] for name, e in stats["experts"].items()} == {"high_noise": 3, "low_noise": 3}
    for entry in stats["experts"].values():
        assert entry["forwards"] + entry["skipped"] == entry["steps"] * 2  # guidance 4 and 3: CFG
    assert set(stats["seconds"]) == {"queued", "encode", "high_noise", "low_noise", "handoff", "decode", "total"}
    assert all(v >= 0 for v in stats["seconds"].values()) and stats["seconds"]["total"] > 0
    assert stats["decode"]["ranks"] == 1 and stats["decode"]["group"] == groups[-1][0]
    assert {name: len(ranks) for name, ranks in stats["memory"].items()} == dict(groups)
    assert all(r["peak_bytes"] > 0 for ranks in stats["memory"].values() for r in ranks)
    assert stats["sources"]["steps"] == "request" and stats["model"]["kind"] == "t2v"
    if len(groups) == 2:  # staged: the state crossed groups once
        assert stats["seconds"]["handoff"] > 0
    assert "layout cfg=" in result.err or "placement staged" in result.err


def test_stats_count_one_forward_per_step_without_guidance(tiny_models, relay, tmp_path):
    """Guidance 1 on the low-noise expert: one branch there, two on the high-noise one."""
    stats_path = tmp_path / "stats.json"
    settings = dict(SETTINGS, guidance_low=1.0)
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(settings), "--dtype", "fp32",
                   "--device", "cpu", "--output", tmp_path / "x.npy", "--stats", stats_path, "--quiet")
    assert result.code == 0, result.err
    experts = json.loads(stats_path.read_text())["experts"]
    assert experts["high_noise"] == {"steps": 3, "forwards": 6, "skipped": 0, "lockstep": 0}
    assert experts["low_noise"] == {"steps": 3, "forwards": 3, "skipped": 0, "lockstep": 0}


def test_resume_runs_on_a_process_group(tiny_models, reference, relay, tmp_path):
    """A snapshot written in this process finishes on a 2-rank group (the same scheduler path)."""
    from relay.engine.state import DenoiseState

    ck = tmp_path / "ck"
    full = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--dtype", "fp32", "--device",
                 "cpu", "--output", tmp_path / "full.npy", "--checkpoint-dir", ck, "--checkpoint-at", "2", "--quiet")
    assert full.code == 0, full.err
    assert DenoiseState.load(ck / "step-0002.pt").step_index == 2
    result = relay("resume", ck / "step-0002.pt", "--model", tiny_models["t2v"], "--dtype", "fp32", "--device",
                   "cpu", "--nproc", 2, "--ring", 2, "--output", tmp_path / "resumed.npy",
                   "--stats", tmp_path / "stats.json", "--quiet")
    assert result.code == 0, result.err
    np.testing.assert_allclose(np.load(tmp_path / "resumed.npy"), reference, atol=1e-4, rtol=0)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["experts"]["high_noise"]["steps"] == 1 and stats["experts"]["low_noise"]["steps"] == 3
    assert stats["seconds"]["encode"] == 0.0 and stats["layout"]["executor"] == "mp"


def test_replicas_serve_requests_side_by_side_with_equal_frames(tiny_models, reference):
    """Two fused replicas (local processes): both take requests, each equals the single process."""
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.stages import request_experts
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    info = read_model_info(tiny_models["t2v"])
    resolved = resolve_request(GenerationRequest(**SETTINGS), info)
    spec = WorkerSpec(model=str(info.path), layout=ParallelLayout(), dtype="fp32", device_type="cpu")
    with Executor(plan_groups(info, resolved, replicas=2), spec, backend="mp") as executor:
        tickets = [executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(info, resolved))
                   for _ in range(4)]
        for ticket in tickets:
            np.testing.assert_allclose(ticket.result(timeout=300), reference, atol=1e-5, rtol=0)
    assert {t.stats.decode["group"] for t in tickets} == {"fused0", "fused1"}  # both replicas worked


def test_checkpoint_every_3_still_writes_every_asked_snapshot(tiny_models, reference, relay, tmp_path):
    """--checkpoint-every 3 makes group calls of 3 steps; the calls are split where a snapshot is
    asked for (2 and 5), and the video is unchanged."""
    from relay.engine.state import DenoiseState

    ck, out = tmp_path / "ck", tmp_path / "x.npy"
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--dtype", "fp32", "--device",
                   "cpu", "--nproc", 2, "--ulysses", 2, "--checkpoint-every", 3, "--checkpoint-dir", ck,
                   "--checkpoint-at", "2,5", "--output", out, "--quiet")
    assert result.code == 0, result.err
    assert sorted(p.name for p in ck.iterdir()) == ["step-0002.pt", "step-0005.pt"]
    assert [DenoiseState.load(ck / f"step-000{k}.pt").step_index for k in (2, 5)] == [2, 5]
    np.testing.assert_allclose(np.load(out), reference, atol=1e-4, rtol=0)


def test_max_retries_is_applied_at_run_time(tiny_models):
    """A request that breaks its group on every try (an in-process group: a rebuild costs a reload,
    not a spawn): with --max-retries 0 it fails after one rebuild, with 1 after two."""
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.stages import request_experts
    from relay.engine.tickets import RequestFailed, SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    info = read_model_info(tiny_models["t2v"])
    resolved = resolve_request(GenerationRequest(**SETTINGS), info)
    spec = WorkerSpec(model=str(info.path), layout=ParallelLayout(), dtype="fp32", device_type="cpu")
    for retries in (0, 1):
        config = SchedulerConfig(max_request_retries=retries, step_timeout_s=60.0)
        with Executor(plan_groups(info, resolved), spec, backend="inprocess", config=config) as executor:
            executor.groups[0].arm_fault({"action": "raise", "method": "advance", "at_step": 1}, persistent=True)
            ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(info, resolved))
            with pytest.raises(RequestFailed, match=f"giving up after {retries} retries"):
                ticket.result(timeout=300)
            assert ticket.attempts == retries + 1 and executor.scheduler.restarts["fused0"] == retries + 1


def test_a_rebuilt_group_is_described_anew(tiny_models, reference):
    """A group rebuilt after a failure may run another kernel (on other GPUs): its ranks are asked
    again, and a request that finishes after the rebuild carries the new description in its
    stats, one that finished before keeps the old one. (The kernel changes here through the
    group's spec between the two builds, as other GPUs would change it.)"""
    from dataclasses import replace

    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.stages import request_experts
    from relay.engine.tickets import SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    info = read_model_info(tiny_models["t2v"])
    resolved = resolve_request(GenerationRequest(**SETTINGS), info)
    spec = WorkerSpec(model=str(info.path), layout=ParallelLayout(), dtype="fp32", device_type="cpu")
    config = SchedulerConfig(max_request_retries=1, step_timeout_s=60.0)
    with Executor(plan_groups(info, resolved), spec, backend="inprocess", config=config) as executor:
        group = executor.groups[0]

        def run():
            ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(info, resolved))
            np.testing.assert_allclose(ticket.result(timeout=300), reference, atol=1e-5, rtol=0)
            return ticket

        before = run()
        group.spec = replace(group.spec, attention="cpu-flash")  # what the next build will load
        group.arm_fault({"action": "raise", "method": "advance", "at_step": 1})  # before the request: no race
        after = run()
        assert executor.scheduler.restarts["fused0"] == 1  # it failed once, was rebuilt, ran again
    assert before.stats.to_dict()["layout"]["groups"][0]["attention"] == "sdpa"
    assert after.stats.to_dict()["layout"]["groups"][0]["attention"] == "cpu-flash"


def test_a_named_kernel_runs_one_rank_and_the_stats_say_which(tiny_models, reference, relay, tmp_path):
    """``--attention cpu-flash`` on one CPU rank: the family's self-attention processors run
    Relay's kernel on the whole sequence (what a CUDA rank does by default) and the video equals
    diffusers' attention (the default on a CPU, the reference); the run stats name the kernel."""
    out, stats_path = tmp_path / "x.npy", tmp_path / "stats.json"
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--dtype", "fp32", "--device",
                   "cpu", "--attention", "cpu-flash", "--output", out, "--stats", stats_path, "--quiet")
    assert result.code == 0, result.err
    np.testing.assert_allclose(np.load(out), reference, atol=1e-5, rtol=0)
    assert json.loads(stats_path.read_text())["layout"]["groups"][0]["attention"] == "cpu-flash"


def test_relay_attention_is_read_on_the_driver_and_handed_to_the_ranks(tiny_models, reference, relay, tmp_path,
                                                                   monkeypatch):
    """``$RELAY_ATTENTION`` is resolved by the command and handed to the ranks in their spec (Ray
    actors on other nodes do not see the driver's environment): the rank is told ``cpu-flash``
    and runs it; a value that names no kernel exits 2 before anything loads."""
    from relay.launch import worker

    seen = []
    build = worker.StageWorker._install_attention

    def spy(self, parallelize):
        seen.append(self.spec.attention)
        monkeypatch.delenv("RELAY_ATTENTION")  # the rank's environment lacks it (another node)
        return build(self, parallelize)

    monkeypatch.setattr(worker.StageWorker, "_install_attention", spy)
    monkeypatch.setenv("RELAY_ATTENTION", "cpu-flash")
    out, stats_path = tmp_path / "x.npy", tmp_path / "stats.json"
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--dtype", "fp32", "--device",
                   "cpu", "--output", out, "--stats", stats_path, "--quiet")
    assert result.code == 0, result.err
    assert seen == ["cpu-flash"]
    assert json.loads(stats_path.read_text())["layout"]["groups"][0]["attention"] == "cpu-flash"
    np.testing.assert_allclose(np.load(out), reference, atol=1e-5, rtol=0)
    monkeypatch.setenv("RELAY_ATTENTION", "magic")
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--device", "cpu",
                   "--output", out, "--quiet")
    assert result.code == 2 and "RELAY_ATTENTION='magic' is not one of" in result.err, result.err


@pytest.mark.parametrize("flags, message", [
    (["--attention", "sdpa", "--nproc", 2, "--ulysses", 2], "sdpa serves groups that do not split the sequence"),
    (["--attention", "cuda-flash"], "attention 'cuda-flash': not a cpu kernel"),
    (["--attention", "cuda-magic"], "invalid choice"),
])
def test_an_attention_kernel_that_cannot_run_is_refused_before_loading(tiny_models, relay, tmp_path, flags, message):
    result = relay("generate", "--model", tiny_models["t2v"], *_flags(SETTINGS), "--device", "cpu",
                   "--output", tmp_path / "x.npy", *flags)
    assert result.code == 2 and message in result.err, result.err
    assert not (tmp_path / "x.npy").exists()
