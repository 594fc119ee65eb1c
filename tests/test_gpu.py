"""GPU checks (opt-in: ``make test PYTEST_ARGS="-m gpu"``); skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SETTINGS = dict(height=64, width=64, frames=9, steps=6, seed=3, guidance=4.0, guidance_low=3.0,
                shift=5.0)


def test_cuda_output_matches_cpu_output(tiny_models):
    """Noise is drawn on the CPU, so the same seed gives the same video on CPU and GPU (fp32)."""
    from relay.engine import Engine, GenerationRequest, load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    request = GenerationRequest(prompt="a fox", **SETTINGS)
    cpu = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu")).generate(request)
    gpu = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cuda")).generate(request)
    np.testing.assert_allclose(gpu, cpu, atol=2e-3, rtol=0)


def test_offload_lowers_resident_memory(tiny_models):
    from relay.engine import Engine, GenerationRequest, load_model

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    resident = Engine(load_model(tiny_models["t2v"], dtype="bf16", device="cuda"))
    held = torch.cuda.memory_allocated() - base
    del resident
    torch.cuda.empty_cache()
    offloaded = Engine(load_model(tiny_models["t2v"], dtype="bf16", device="cuda", offload=True))
    assert torch.cuda.memory_allocated() - base < held
    # Host copies are pinned (asynchronous copies to the GPU) and stay: nothing is copied back.
    assert all(host.is_pinned() for copies in offloaded.model._host.values() for host in copies.values())
    frames = offloaded.generate(GenerationRequest(prompt="a fox", **SETTINGS))
    assert frames.shape == (9, 64, 64, 3) and np.isfinite(frames).all()
    high = offloaded.model.experts["high_noise"]
    assert all(p.device.type == "cpu" for p in high.parameters())  # it left when the low-noise one came


def test_offload_prefetch_overlaps_the_switch_and_changes_nothing(tiny_models, monkeypatch):
    """With offload, the low-noise expert's copies start on the copy stream during the
    high-noise expert's last step; the video equals the resident model's bit for bit, and equals
    it too when there is no room to prefetch (the switch copies as before)."""
    from relay.engine import Engine, GenerationRequest, load_model
    from relay.engine import loader

    request = GenerationRequest(prompt="a fox", **SETTINGS)
    resident = Engine(load_model(tiny_models["t2v"], dtype="bf16", device="cuda")).generate(request)
    offloaded = Engine(load_model(tiny_models["t2v"], dtype="bf16", device="cuda", offload=True))
    assert np.array_equal(offloaded.generate(request), resident)
    assert offloaded.model.prefetches == {"started": 1, "no_room": 0, "fell_back": 0}
    assert offloaded.model._incoming is None  # taken by the switch
    monkeypatch.setattr(loader, "prefetch_fits", lambda *args, **kwargs: False)
    assert np.array_equal(offloaded.generate(request), resident)
    assert offloaded.model.prefetches == {"started": 1, "no_room": 1, "fell_back": 0}


def test_the_switch_waits_for_the_prefetch_copies(tiny_models):
    """The compute stream is ordered after the prefetch's copies: with the copy stream held
    back by a GPU sleep and no host synchronisation, the low-noise expert's first forward still
    reads its weights (its output equals the one after a plain switch). The copy stream's pool
    is filled with NaN first, so that a forward that did not wait would read NaN, not weights
    an earlier test left in the reused memory."""
    from relay.bench.gpu import model_inputs
    from relay.engine import load_model

    model = load_model(tiny_models["t2v"], dtype="bf16", device="cuda", offload=True)
    inputs = model_inputs(dict(model.experts["low_noise"].config), 32, 32, 5, torch.device("cuda"), torch.bfloat16)
    with torch.no_grad():
        expected = model.on_device("low_noise")(**inputs)[0]
        model.on_device("high_noise")(**inputs)  # the low-noise expert leaves
        torch.cuda.synchronize()
        model._copy_stream = torch.cuda.Stream()
        with torch.cuda.stream(model._copy_stream):
            poison = [torch.full(host.shape, float("nan") if host.is_floating_point() else 1, dtype=host.dtype,
                                 device="cuda") for host in model._host["low_noise"].values()]
            del poison  # the blocks the copies will be given, now holding NaN
            torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock before the copies
        assert model.prefetch("low_noise")
        got = model.on_device("low_noise")(**inputs)[0]
    assert torch.equal(got, expected)


def test_xfuser_attention_imports_and_runs_on_cuda(tmp_path):
    """The CUDA branch of xfuser's attention imports (the yunchang NPU import is handled) and a
    1-rank USP attention equals SDPA."""
    import torch.distributed as dist

    from relay.parallel.groups import RankInfo, destroy_groups, init_groups
    from relay.parallel.layout import ParallelLayout
    from relay.parallel import xdit

    loaded = xdit.load()
    assert loaded.LongContextAttention.__mro__[1] is not object
    init_groups(ParallelLayout(), RankInfo(rank=0, local_rank=0, world_size=1,
                                           init_method=f"file://{tmp_path}/rdzv"), device_type="cuda")
    try:
        from yunchang.globals import PROCESS_GROUP

        PROCESS_GROUP.ULYSSES_PG = PROCESS_GROUP.RING_PG = dist.group.WORLD
        for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):  # fp32: the efficient kernel
            q, k, v = (torch.randn(1, 256, 8, 64, device="cuda", dtype=dtype) for _ in range(3))
            for padded in (False, True):
                out = xdit.make_attention(torch.device("cuda"), padded=padded)(None, q, k, v)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)
                assert out.dtype == dtype and (out.float() - ref).abs().max() < tol
    finally:
        destroy_groups()


def test_every_cuda_kernel_equals_sdpa_and_returns_an_fp32_lse():
    """Each kernel of :mod:`parallel.kernels` this GPU runs, in each dtype it takes, against fp32
    attention and the exact log-sum-exp (S = 1000: not a multiple of any kernel's block), the
    LSE fp32 as the op returns it; and the check on the device (:func:`parallel.kernels.verify`)
    passes every kernel that is right here (its tolerances must not refuse a correct kernel)."""
    from relay.parallel.kernels import KERNELS, _installed, verify

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 4, 128, device="cuda") for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    ref_lse = torch.logsumexp(torch.einsum("bshd,bthd->bhst", q, k) / 128 ** 0.5, dim=-1)
    capability = torch.cuda.get_device_capability()
    ran = set()
    for kernel in (k for k in KERNELS.values() if k.device == "cuda" and _installed(k.name) and k.runs_on(capability)):
        for dtype in kernel.dtypes:
            try:
                out, lse = kernel.raw(q.to(dtype), k.to(dtype), v.to(dtype))
            except RuntimeError:
                if kernel.name == "cuda-cudnn":  # cuDNN attention needs a recent GPU and cuDNN
                    continue
                raise
            assert verify(kernel, torch.device("cuda"), dtype, 128) is None, (kernel.name, dtype)
            ran.add(kernel.name)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert lse.dtype == torch.float32 and lse.shape == (1, 4, 1000), kernel.name
            assert (out.float() - ref).abs().max() < tol, (kernel.name, dtype)
            assert (lse - ref_lse).abs().max() < tol * 10, (kernel.name, dtype)
    assert {"cuda-flash", "cuda-efficient"} <= ran


def test_one_cuda_rank_runs_the_chosen_kernel_and_records_it(tiny_models, relay, tmp_path):
    """A one-GPU ``relay generate`` runs the self-attention on the kernel chosen for this GPU
    (not torch's default dispatch) and its stats name it; the video stays within bf16 error of
    the run on the library's attention (``--attention sdpa``)."""
    import json

    from relay.engine.model_info import read_model_info
    from relay.parallel import kernels

    head_dim = read_model_info(tiny_models["t2v"]).transformer_config["attention_head_dim"]
    frames, names = {}, {}
    for attention in ("auto", "sdpa"):
        out, stats = tmp_path / f"{attention}.npy", tmp_path / f"{attention}.json"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
        result = relay("generate", "--model", tiny_models["t2v"], "--prompt", "a fox", *flags, "--device", "cuda",
                       "--dtype", "bf16", "--attention", attention, "--output", out, "--stats", stats, "--quiet")
        assert result.code == 0, result.err
        frames[attention] = np.load(out)
        names[attention] = json.loads(stats.read_text())["layout"]["groups"][0]["attention"]
    assert names == {"auto": kernels.choose(torch.device("cuda"), torch.bfloat16, head_dim).name, "sdpa": "sdpa"}
    assert float(np.abs(frames["auto"] - frames["sdpa"]).max()) < 0.1
