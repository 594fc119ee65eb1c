"""``relay bench``: every bench runs in its smoke mode through the real command line (in this
process) and prints its table and writes its JSON; the GPU bench's arithmetic on a CPU."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOC_KEYS = {"bench", "machine", "cpu", "device", "versions", "settings", "raw", "summary", "created"}


def _document(folder: Path, name: str) -> dict:
    files = sorted(folder.glob(f"{name}-*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert DOC_KEYS <= set(doc) and doc["bench"] == name
    assert {"torch", "diffusers", "transformers", "xfuser", "grpcio", "ray", "python"} <= set(doc["versions"])
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["settings"]["smoke"] is True
    return doc


def _rows(out: str, labels) -> None:
    lines = out.splitlines()
    for label in labels:
        assert any(line.startswith(label) for line in lines), (label, out)


def test_bench_package_comes_from_this_repo():
    from relay import bench

    assert Path(bench.__file__).resolve().parent == REPO / "bench"


def test_building_the_bench_parser_imports_no_heavy_library():
    """Every ``relay`` command builds the bench sub-commands: they must stay cheap."""
    code = ("import argparse, sys; from relay.cli import bench as bench_cli; "
            "bench_cli.add_parser(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'grpc', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_has_the_benches_and_the_stage_slots():
    """Every registered bench that is built has the module interface documented in ``bench``."""
    import importlib.util

    from relay.bench import BENCHES

    assert {"engine", "parallel", "serve", "gpu", "stages", "scaling"} <= set(BENCHES)
    built = [name for name, (module, _) in BENCHES.items() if importlib.util.find_spec(module) is not None]
    assert {"engine", "parallel", "serve", "gpu", "stages", "scaling"} <= set(built)
    for name in built:
        module = importlib.import_module(BENCHES[name][0])
        assert all(callable(getattr(module, fn)) for fn in ("add_arguments", "skip_reason", "run")), name


def test_cli_smoke(relay, tmp_path):
    result = relay("bench", "cli", "--smoke", "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["relay --help", "relay --version", "relay generate --help", "python -c pass"])
    doc = _document(tmp_path, "cli")
    assert all(len(times) == 2 for times in doc["raw"].values())
    helps = {k: v for k, v in doc["summary"].items() if k.startswith("relay")}
    assert len(helps) == 10 and all(v["median_s"] > 0 for v in helps.values())


def test_results_go_to_a_user_folder_not_the_package(monkeypatch, tmp_path):
    from relay.bench import common

    monkeypatch.delenv("RELAY_RESULTS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert common.results_dir() == tmp_path / "relay" / "bench"
    monkeypatch.setenv("RELAY_RESULTS", str(tmp_path / "mine"))
    assert common.results_dir() == tmp_path / "mine"
    monkeypatch.delenv("RELAY_RESULTS")
    written = common.write_result("probe", common.BenchResult(settings={}, raw={}, summary={}, table=""))
    assert written.parent == tmp_path / "relay" / "bench"
    assert not str(written).startswith(str(Path(common.__file__).parent))


def test_engine_smoke(relay, tiny_models, tmp_path):
    result = relay("bench", "engine", "--smoke", "--model", tiny_models["t2v"], "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["relay engine", "diffusers WanPipeline", "median ratio relay/diffusers"])
    doc = _document(tmp_path, "engine")
    assert len(doc["raw"]["relay_s"]) == len(doc["raw"]["diffusers_s"]) == doc["settings"]["rounds"] == 2
    assert doc["summary"]["median_ratio"] > 0 and doc["summary"]["max_abs_diff"] < 1e-4
    assert doc["device"] and doc["settings"]["steps"] == 4


@pytest.mark.slow  # 30-75 s of multi-process groups on 2 cores: the benchmark runs, its numbers are not tested
def test_parallel_smoke(relay, tiny_models, tmp_path):
    target = tmp_path / "parallel.json"
    result = relay("bench", "parallel", "--smoke", "--model", tiny_models["t2v"], "--json", target)
    assert result.code == 0, result.err
    names = ["1 process", "ulysses=2", "ring=2", "cfg=2", "ulysses=2 fsdp=2"]
    _rows(result.out, names)
    doc = json.loads(target.read_text())
    assert DOC_KEYS <= set(doc) and doc["settings"]["sizes"] == [1, 2]
    assert set(doc["summary"]) == set(names)
    assert doc["summary"]["1 process"]["speedup_vs_1"] == pytest.approx(1.0)
    assert all(entry["median_step_s"] > 0 for entry in doc["summary"].values())
    assert all(len(steps) == 4 for entry in doc["raw"].values() for steps in entry["step_s"])


@pytest.mark.slow  # 30-75 s of multi-process groups on 2 cores: the benchmark runs, its numbers are not tested
def test_serve_smoke(relay, tiny_models, tmp_path):
    result = relay("bench", "serve", "--smoke", "--model", tiny_models["t2v"], "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["first event (accepted), one request", "stream events/s, a progress event per step",
                       "50 concurrent streams completed OK", "50 concurrent: first event p50 / p95"])
    summary = _document(tmp_path, "serve")["summary"]
    assert summary["concurrent_streams"] == summary["concurrent_ok"] == 50
    assert summary["first_event_kind"] == "accepted"
    assert 0 < summary["first_event_p50_s"] <= summary["first_progress_p50_s"] <= summary["single_total_p50_s"]
    assert summary["concurrent_first_event_p50_s"] <= summary["concurrent_first_event_p95_s"]
    assert summary["stream_events_per_s"] > 0 and summary["stream_preview_events_per_s"] > 0


@pytest.mark.slow  # 30-75 s of multi-process groups on 2 cores: the benchmark runs, its numbers are not tested
def test_stages_smoke(relay, tiny_models, tmp_path):
    result = relay("bench", "stages", "--smoke", "--model", tiny_models["t2v"], "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["staged, overlap", "staged, no overlap", "fused x2 replicas", "overlap speed-up: achieved"])
    summary = _document(tmp_path, "stages")["summary"]
    assert set(summary["requests_per_minute"]) == {"overlap", "no_overlap", "fused"}
    assert all(v > 0 for v in summary["requests_per_minute"].values())
    assert 1.0 <= summary["ideal_speedup"] <= 2.0
    assert summary["achieved_over_ideal"] == pytest.approx(summary["achieved_speedup"] / summary["ideal_speedup"])
    assert 0 < summary["utilisation"]["high"] <= 1.0 and 0 < summary["utilisation"]["low"] <= 1.0


@pytest.mark.slow  # 30-75 s of multi-process groups on 2 cores: the benchmark runs, its numbers are not tested
def test_scaling_smoke(relay, tiny_models, tmp_path):
    result = relay("bench", "scaling", "--smoke", "--model", tiny_models["t2v"], "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["1 ", "2 ", "planned = the cost model's absolute step time"])
    doc = _document(tmp_path, "scaling")
    assert doc["settings"]["sizes"] == [1, 2]
    for size in ("1", "2"):
        entry = doc["summary"][size]
        assert entry["measured_step_s"] > 0 and entry["planned_step_s"] > 0
    steps = doc["settings"]["steps"]
    for size in ("1", "2"):
        entry = doc["summary"][size]
        # A video takes at least its denoise steps; a step is not faster than 1/N of one device's.
        assert entry["video_s"] >= steps * entry["measured_step_s"] * 0.9
        assert 0 < entry["measured_speedup"] <= int(size) * 1.25
    # On a CPU the ranks split this machine's cores (one core's measured rates times a rank's
    # threads): two ranks each do half the work at half the rate, so the planner predicts no
    # gain, only the cost of their communication -- never a better than linear speed-up.
    one, two = doc["summary"]["1"]["planned_step_s"], doc["summary"]["2"]["planned_step_s"]
    cores = os.cpu_count() or 1
    if cores // 2 * 2 == cores:  # the cores divide evenly: equal compute, plus communication
        assert one <= two
    assert one / 2 <= two
    # scaled(2) is measured(1) x planned(2)/planned(1), not a copy of measured(2).
    assert doc["summary"]["2"]["scaled_step_s"] == pytest.approx(doc["summary"]["1"]["measured_step_s"] * two / one)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_cache_smoke(relay, tiny_models, tmp_path):
    result = relay("bench", "cache", "--smoke", "--model", tiny_models["t2v"], "--caches", "fbc:0;fbc:0.1",
                   "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["none", "fbc:0 ", "fbc:0.1"])
    summary = _document(tmp_path, "cache")["summary"]
    assert summary["fbc:0"]["max_abs_diff"] == 0 and summary["fbc:0"]["skipped_fraction"] == 0
    assert summary["fbc:0.1"]["skipped_fraction"] > 0 and summary["fbc:0.1"]["max_abs_diff"] > 0


def test_vae_smoke(relay, tiny_models, tmp_path):
    result = relay("bench", "vae", "--smoke", "--model", tiny_models["t2v"], "--results", tmp_path)
    assert result.code == 0, result.err
    _rows(result.out, ["1 ", "2 "])
    summary = _document(tmp_path, "vae")["summary"]
    assert summary["1"]["max_abs_diff"] == 0 and summary["2"]["max_abs_diff"] < 1e-4


def test_gpu_bench_skips_without_cuda(relay, tmp_path):
    result = relay("bench", "gpu", "--smoke", "--results", tmp_path)
    assert result.code == 0
    assert "relay bench gpu: skipped: no CUDA device" in result.out
    assert not list(tmp_path.iterdir())


def test_gpu_bench_arithmetic_in_cpu_test_mode(relay, tmp_path):
    from relay.bench.gpu import TINY
    from relay.engine.models.wan.flops import transformer_flops, video_tokens

    target = tmp_path / "gpu.json"
    result = relay("bench", "gpu", "--device", "cpu", "--config", "tiny", "--dtype", "fp32", "--smoke",
                   "--attention", "relay,native,_native_flash", "--rounds", "2", "--json", target)
    assert result.code == 0, result.err
    _rows(result.out, ["32x32x5"])
    doc = json.loads(target.read_text())
    peak = doc["summary"]["matmul_peak_tflops"]
    ours, measured, refused = doc["summary"]["rows"]
    # relay: the self-attention on the kernel a rank chooses (the CPU's), cross-attention on SDPA
    assert ours["backend"] == "relay:cpu-flash" and ours["flops"] == measured["flops"]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ours["attention_ops"]
    assert len(doc["raw"]["forward_s"]["32x32x5/relay:cpu-flash"]) == 2
    tokens = video_tokens(TINY, height=32, width=32, frames=5)
    assert measured["tokens"] == tokens == 8
    assert measured["flops"] == transformer_flops(TINY, tokens, text_tokens=512)["total"]
    assert measured["tflops"] == pytest.approx(measured["flops"] / measured["median_s"] / 1e12)
    assert measured["mfu"] == pytest.approx(measured["tflops"] / peak)
    assert any("scaled_dot_product" in op for op in measured["attention_ops"])
    assert len(doc["raw"]["forward_s"]["32x32x5/native"]) == 2
    assert refused["backend"] == "_native_flash" and refused["error"] == "CUDA only"


def test_gpu_bench_warms_the_peak_up_and_times_rounds(relay, tmp_path):
    target = tmp_path / "gpu.json"
    result = relay("bench", "gpu", "--device", "cpu", "--config", "tiny", "--dtype", "fp32", "--smoke",
                   "--attention", "native", "--rounds", "1", "--json", target)
    assert result.code == 0, result.err
    peak = json.loads(target.read_text())["summary"]["matmul_peak"]
    assert peak["warmup_s"] >= 0.2 and len(peak["rounds_tflops"]) == 3
    assert peak["tflops"] == max(peak["rounds_tflops"])
    assert "of warm-up" in result.out


@pytest.mark.slow  # torch.compile on the CPU: ~30 s
def test_gpu_bench_compile_reports_speedup_and_output_difference(relay, tmp_path):
    target = tmp_path / "gpu.json"
    result = relay("bench", "gpu", "--device", "cpu", "--config", "tiny", "--dtype", "fp32", "--smoke",
                   "--attention", "native", "--rounds", "2", "--compile", "--json", target)
    assert result.code == 0, result.err
    eager, compiled = json.loads(target.read_text())["summary"]["rows"]
    assert not eager["compiled"] and compiled["compiled"]
    assert compiled["speedup"] == pytest.approx(eager["median_s"] / compiled["median_s"])
    assert 0 <= compiled["max_abs_diff"] < 1e-4 * max(compiled["reference_max_abs"], 1.0)
    assert "x eager, max |diff|" in result.out


def test_gpu_bench_flops_of_the_a14b_expert():
    """~6.5 PFLOP per 720p forward (S = 75,600) as in the design notes; 14.3B parameters."""
    from relay.bench.gpu import A14B, build_model, flops_per_forward, utilisation

    tokens, flops = flops_per_forward(A14B, 720, 1280, 81)
    assert tokens == 75_600 and flops == pytest.approx(6.52e15, rel=0.01)
    assert flops_per_forward(A14B, 480, 832, 81)[0] == 32_760
    assert utilisation(flops, 10.0, 800.0) == pytest.approx({"tflops": 652.3, "mfu": 652.3 / 800}, rel=1e-3)
    model = build_model(A14B, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(14.29e9, rel=0.01)
    assert model.scale_shift_table.dtype == torch.float32 and model.blocks[0].ffn.net[2].weight.dtype == torch.bfloat16


def test_bad_settings_exit_2(relay, tmp_path):
    result = relay("bench", "gpu", "--device", "cpu", "--config", "tiny", "--attention", "nope")
    assert result.code == 2 and "--attention: unknown backend nope" in result.err
    result = relay("bench", "gpu", "--device", "cpu", "--results", tmp_path)
    assert result.code == 0 and "skipped: the A14B forward needs a CUDA device" in result.out
    assert not list(tmp_path.iterdir())
    result = relay("bench", "engine", "--rounds", "0", "--results", tmp_path)
    assert result.code == 2 and "--rounds" in result.err
    assert relay("bench").code == 2


def test_all_runs_what_fits_and_passes_over_slots(relay, tmp_path, monkeypatch):
    """``relay bench all`` with a fake registry: a bench that runs, one that skips, a slot."""
    from relay import bench
    from relay.bench.common import BenchResult

    fake = types.ModuleType("bench_fake_for_test")
    fake.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=3)
    fake.skip_reason = lambda args: None
    fake.run = lambda args: BenchResult(settings={"size": args.size, "smoke": args.smoke}, raw={"s": [1.0]},
                                        summary={"s": 1.0}, table=f"fake table size={args.size}")
    skipper = types.ModuleType("bench_skip_for_test")
    skipper.add_arguments = lambda parser: None
    skipper.skip_reason = lambda args: "no such device"
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(sys.modules, skipper.__name__, skipper)
    monkeypatch.setattr(bench, "BENCHES", {"fake": (fake.__name__, "a fake"), "skip": (skipper.__name__, "skips"),
                                           "slot": ("relay.bench.not_built_yet", "a slot")})
    result = relay("bench", "all", "--smoke", "--results", tmp_path)
    assert result.code == 0, result.err
    assert "fake table size=3" in result.out and "relay bench skip: skipped: no such device" in result.out
    assert "slot not built yet" in result.out
    assert _document(tmp_path, "fake")["summary"] == {"s": 1.0}
    result = relay("bench", "slot")
    assert result.code == 1 and "not built yet" in result.err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_on_cuda(relay, tmp_path):
    result = relay("bench", "gpu", "--smoke", "--results", tmp_path)
    assert result.code == 0, result.err
    doc = _document(tmp_path, "gpu")
    row = doc["summary"]["rows"][0]
    assert row["size"] == "480p" and row["tokens"] == 32_760 and 0 < row["mfu"] < 1.5
    assert row["peak_gib"] > doc["summary"]["weights_gib"] > 25


def test_the_device_checks_skip_every_check_without_a_gpu(tmp_path):
    """The device check's Python half runs here as a dry run: every check is named and skipped."""
    out = tmp_path / "checks.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "device" / "checks.py"), "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert set(doc) == {"kernels", "kernels_at_sp_shapes", "parity", "nccl_world1", "offload_switch"}
    assert {r["status"] for r in doc.values()} == {"skip"}


def test_the_kernel_timings_are_read_against_the_choice():
    """The device check's kernel rows at the SP shapes: the fastest per shape, and the chosen
    kernel's time over it (a kernel that failed has no time and is never the fastest)."""
    sys.path.insert(0, str(REPO / "bench" / "device"))
    try:
        import checks
    finally:
        sys.path.pop(0)
    rows = {"ulysses8/cuda-flash": {"ms": 30.0}, "ulysses8/cuda-cudnn": {"ms": 20.0},
            "ulysses8/cuda-efficient": {"error": "x"}, "ring8_block/cuda-flash": {"ms": 9.0},
            "ring8_block/cuda-cudnn": {"ms": 12.0}}
    fastest, ratio = checks.against_choice(rows, "cuda-cudnn")
    assert fastest == {"ulysses8": "cuda-cudnn", "ring8_block": "cuda-flash"}
    assert ratio == {"ulysses8": 1.0, "ring8_block": pytest.approx(12.0 / 9.0)}
    assert checks.against_choice(rows, "cuda-efficient")[1] == {}


def test_the_offload_switch_check_runs_its_forwards_on_the_cpu():
    """The device check's offload measurement, shrunk to the tiny architecture on the CPU: the
    three variants run interleaved, the outputs with and without the prefetch agree, and off
    CUDA no prefetch starts (the check says skip)."""
    sys.path.insert(0, str(REPO / "bench" / "device"))
    try:
        import checks
    finally:
        sys.path.pop(0)
    from relay.bench.gpu import TINY

    row = checks.check_offload_switch(torch.device("cpu"), config=TINY, layers=2, size=(32, 32, 5), rounds=2)
    assert row["status"] == "skip" and row["equal_output"] and row["prefetch_started"] == [False, False]
    assert {variant: len(times) for variant, times in row["variant_seconds"].items()} == {
        "no_switch": 2, "switch": 2, "switch_prefetched": 2}
    assert row["prefetches"] == {"started": 0, "no_room": 0, "fell_back": 0} and row["expert_gib"] > 0
