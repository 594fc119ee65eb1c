"""The attention kernels of sequence parallelism (issue 12): the CUDA side's rules proven on a CPU.

* Every CUDA kernel returns its log-sum-exp in fp32, run through the real aten ops on the meta
  device (their shape and dtype functions; no GPU needed).
* Selection follows the ops' dtype rules: fp32 sequence parallelism gets a kernel that takes
  fp32 (the flash op takes only half precision); an override that cannot take the dtype is
  refused with the ones that can. Each GPU architecture gets its order (Hopper: FA3 where
  installed, then cuDNN; Blackwell: cuDNN; Ampere/Ada: flash), and FA3's two API generations
  are read right (a stand-in ``flash_attn_interface`` module built on the CPU op).
* The check on the device: a kernel whose LSE is bf16-rounded, that raises, or that returns the
  wrong dtype is passed over for the next one (or refused, when it was named).
* The ring merge in bf16: a real 2-rank ring on gloo, bf16 inputs, stays within bf16-level error
  of the single-process attention; the same merge fed a bf16 LSE (yunchang's torch-flash path)
  does not.
* A ring rank whose own key block is all padding: the merge stays finite.
* The SP forward with the CUDA kernel choice on meta tensors: no CPU tensor enters it.
"""

from __future__ import annotations

import sys

import pytest
import torch

from relay.parallel import kernels

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("name", [n for n, k in kernels.KERNELS.items() if k.device == "cuda" and k.package is None])
def test_every_cuda_kernel_returns_an_fp32_lse(name):
    kernel = kernels.KERNELS[name]
    for dtype in kernel.dtypes:
        q = torch.randn(2, 100, 4, 64, device="meta", dtype=dtype)  # 100: not a multiple of 32
        out, lse = kernel(q, q, q)
        assert out.dtype == dtype and out.shape == q.shape
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 100)


def test_auto_never_reads_the_environment(monkeypatch):
    """A rank told ``auto`` (what the command resolved) does not read its own RELAY_ATTENTION;
    told nothing, it does."""
    monkeypatch.setenv(kernels.ENV, "cuda-cudnn")
    assert kernels.requested(kernels.AUTO) is None
    assert kernels.requested(None) == "cuda-cudnn"
    assert kernels.requested("cpu-flash") == "cpu-flash"


def test_selection_follows_the_ops_dtype_rules(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.select("cuda", torch.bfloat16, 128).name == "cuda-flash"
    assert kernels.select("cuda", torch.float16, 128).name == "cuda-flash"
    fp32 = kernels.select("cuda", torch.float32, 128)
    assert fp32.name == "cuda-efficient" and fp32.accepts(torch.float32)
    assert not kernels.KERNELS["cuda-flash"].accepts(torch.float32)  # the flash op's own rule
    assert kernels.select("cuda", torch.bfloat16, 264).name == "cuda-efficient"  # flash: head_dim <= 256
    assert kernels.select("meta", torch.float32).name == "cuda-efficient"  # meta follows CUDA
    assert kernels.select("cpu", torch.bfloat16).name == "cpu-flash"
    assert kernels.select("cuda", torch.bfloat16, 128, prefer="cuda-cudnn").name == "cuda-cudnn"
    with pytest.raises(ValueError, match="attention 'cuda-flash': not a cuda kernel for float32.*cuda-efficient"):
        kernels.select("cuda", torch.float32, 128, prefer="cuda-flash")
    with pytest.raises(ValueError, match="one-device runs only"):
        kernels.select("cuda", torch.bfloat16, 128, prefer="sdpa")
    monkeypatch.setenv(kernels.ENV, "no-such")
    with pytest.raises(ValueError, match="no-such"):
        kernels.select("cuda", torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.select("cuda", torch.bfloat16, 128).name == "cuda-flash"


def _stand_in_fa3(monkeypatch, *, asks: bool, returns_lse: bool = True):
    """A ``flash_attn_interface`` module whose ``flash_attn_func`` computes with the CPU flash op
    in FA's ``(batch, seq, heads, dim)`` layout: ``asks``: the newer API (the LSE only with
    ``return_attn_probs``); otherwise the earlier one (always ``(out, lse)``, or only ``out``
    with ``returns_lse`` false)."""
    import importlib.machinery
    import sys
    import types

    def compute(q, k, v, softmax_scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, scale=softmax_scale)[:2]
        return out.transpose(1, 2), lse

    if asks:
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
            out, lse = compute(q, k, v, softmax_scale)
            return (out, lse) if return_attn_probs else out
    else:
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
            out, lse = compute(q, k, v, softmax_scale)
            return (out, lse) if returns_lse else out
    module = types.ModuleType("flash_attn_interface")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn_interface", None)
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)


def test_each_gpu_architecture_gets_its_order(monkeypatch):
    """Hopper: FA3 where installed, then cuDNN; Blackwell: cuDNN; Ampere/Ada: torch's flash;
    before Ampere: efficient; fp32 everywhere: efficient."""
    monkeypatch.delenv(kernels.ENV, raising=False)

    def pick(capability, dtype=torch.bfloat16, head_dim=128):
        return kernels.select("cuda", dtype, head_dim, capability=capability).name

    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # not installed, whatever this box has
    assert not kernels._installed("flash-attn-3")
    assert [pick(c) for c in ((9, 0), (10, 0), (12, 0), (8, 0), (8, 6), (8, 9), (7, 5))] == [
        "cuda-cudnn", "cuda-cudnn", "cuda-cudnn", "cuda-flash", "cuda-flash", "cuda-flash", "cuda-efficient"]
    assert {pick(c, torch.float32) for c in ((9, 0), (10, 0), (8, 6), (7, 5))} == {"cuda-efficient"}
    assert pick((9, 0), head_dim=264) == "cuda-efficient"
    with pytest.raises(ValueError, match="not a cuda kernel for bfloat16 with head_dim 128 on sm75"):
        kernels.select("cuda", torch.bfloat16, 128, capability=(7, 5), prefer="cuda-flash")
    _stand_in_fa3(monkeypatch, asks=True)
    assert kernels._installed("flash-attn-3")
    assert [pick(c) for c in ((9, 0), (10, 0), (8, 6))] == ["flash-attn-3", "cuda-cudnn", "cuda-flash"]
    with pytest.raises(ValueError, match="flash-attn-3"):  # FA3 is built for Hopper alone
        kernels.select("cuda", torch.bfloat16, 128, capability=(8, 0), prefer="flash-attn-3")


def test_a_driver_may_name_a_kernel_only_its_ranks_have(monkeypatch):
    """flash-attn not installed here: refused for ranks on this machine, accepted for ranks
    elsewhere (a Ray cluster's nodes), whose own load checks it."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert not kernels._installed("flash-attn")
    with pytest.raises(ValueError, match="'flash-attn'"):
        kernels.select("cuda", torch.bfloat16, 128, prefer="flash-attn")
    assert kernels.select("cuda", torch.bfloat16, 128, prefer="flash-attn", installed=False).name == "flash-attn"


@pytest.mark.parametrize("api", ["asks", "always"])
def test_the_fa3_kernel_reads_both_api_generations(monkeypatch, api):
    """FA3's ``flash_attn_func`` returns ``(out, lse)`` always (earlier builds) or only when asked
    (later ones): the kernel gets the LSE either way, in Relay's layout."""
    _stand_in_fa3(monkeypatch, asks=api == "asks")
    monkeypatch.setattr(kernels, "_FA3", None)  # resolved again for this stand-in
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 50, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    out, lse = kernels.KERNELS["flash-attn-3"](q, k, v)
    ref_out, ref_lse = kernels.KERNELS["cpu-flash"](q, k, v)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert kernels.verify(kernels.KERNELS["flash-attn-3"], torch.device("cpu"), torch.bfloat16, 16) is None


def test_an_fa3_build_without_the_lse_is_passed_over(monkeypatch):
    _stand_in_fa3(monkeypatch, asks=False, returns_lse=False)
    monkeypatch.setattr(kernels, "_FA3", None)
    why = kernels.verify(kernels.KERNELS["flash-attn-3"], torch.device("cpu"), torch.bfloat16, 16)
    assert why is not None and "returns no log-sum-exp" in why


def _bf16_lse(q, k, v, scale):
    """The defect of yunchang's torch-flash path: the LSE rounded to bf16 (then widened again)."""
    out, lse = kernels._cpu_flash(q, k, v, scale)
    return out, lse.bfloat16().float()


def _raises(q, k, v, scale):
    raise RuntimeError("no kernel image is available for execution on the device")


def _input_dtype_lse(q, k, v, scale):
    """An LSE in the inputs' dtype, as yunchang's torch-flash path returns it."""
    out, lse = kernels._cpu_flash(q, k, v, scale)
    return out, lse.to(q.dtype)


def _fp32_out(q, k, v, scale):
    out, lse = kernels._cpu_flash(q, k, v, scale)
    return out.float(), lse


def test_the_check_on_the_device_can_fail():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kernels.verify(kernels.KERNELS["cpu-flash"], cpu, dtype, 64) is None
    cases = [(_bf16_lse, torch.float32, "LSE by"), (_bf16_lse, torch.bfloat16, "LSE by"),
             (_raises, torch.bfloat16, "RuntimeError: no kernel image"), (_fp32_out, torch.bfloat16, "torch.float32"),
             (_input_dtype_lse, torch.float16, "lse (2, 2, 257) torch.float16"),
             (_input_dtype_lse, torch.bfloat16, "lse (2, 2, 257) torch.bfloat16")]
    for call, dtype, want in cases:
        why = kernels.verify(kernels.Kernel("bad", "cpu", kernels.ALL, call), cpu, dtype, 64)
        assert why is not None and want in why, (call.__name__, dtype, why)


def test_a_kernel_that_fails_its_check_is_passed_over_or_refused_when_named(monkeypatch):
    """The first kernel of the order fails on this device: the next is taken, the reason kept;
    named, it is refused with the reason. The choice is made once per process."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_CHOICES", {})
    broken = kernels.Kernel("cpu-broken", "cpu", kernels.ALL, _bf16_lse)
    monkeypatch.setitem(kernels.KERNELS, "cpu-broken", broken)
    monkeypatch.setattr(kernels, "preference", lambda device_type, capability=None: ("cpu-broken", "cpu-flash"))
    choice = kernels.choose("cpu", torch.bfloat16, 32)
    assert choice.name == "cpu-flash" and "LSE by" in choice.passed_over["cpu-broken"]
    assert kernels.choose("cpu", torch.bfloat16, 32) is choice
    with pytest.raises(ValueError, match="attention 'cpu-broken' fails on this device.*LSE by.*others here: cpu-flash"):
        kernels.choose("cpu", torch.bfloat16, 32, prefer="cpu-broken")
    monkeypatch.setattr(kernels, "preference", lambda device_type, capability=None: ("cpu-broken",))
    with pytest.raises(ValueError, match="no cpu kernel for float32 with head_dim 32 works: cpu-broken"):
        kernels.choose("cpu", torch.float32, 32)


def test_the_cpu_kernel_equals_sdpa_and_its_lse_is_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = kernels.KERNELS["cpu-flash"](q.to(dtype), k.to(dtype), v.to(dtype))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        scores = torch.einsum("bshd,bthd->bhst", q, k) / 4.0
        assert lse.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (out.float() - ref).abs().max() < tol
        assert (lse - torch.logsumexp(scores, dim=-1)).abs().max() < (1e-4 if dtype == torch.float32 else 5e-2)


def _merge(blocks, q, kernel, lse_dtype=torch.float32):
    """yunchang's ring merge over key/value blocks, as each ring step runs it."""
    from yunchang.ring.utils import update_out_and_lse

    out = lse = None
    for k, v in blocks:
        block_out, block_lse = kernel(q, k, v)
        out, lse = update_out_and_lse(out, lse, block_out, block_lse.to(lse_dtype).float())
    return out


def test_an_all_padding_first_block_keeps_the_ring_merge_finite():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 2, 16)
    padding = (torch.full((1, 8, 2, 16), float("nan")), torch.zeros(1, 8, 2, 16))
    real = [(torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)) for _ in range(2)]
    kernel = kernels.masked(kernels.KERNELS["cpu-flash"])
    first = _merge([padding, *real], q, kernel)
    assert torch.isfinite(first).all()  # was NaN from the second merge on with a -inf LSE
    # Merged after a real block, an all-padding block weighs nothing: exact.
    ref = _merge(real, q, kernels.KERNELS["cpu-flash"])
    assert (_merge([real[0], padding, real[1]], q, kernel) - ref).abs().max() < 1e-6
    # First, it leaves the LSE at -1e4 + x (fp32 keeps x to ~1e-3 there): close, and only ever
    # for a rank whose own chunk is all padding -- whose query rows are all dropped at the gather.
    assert (first - ref).abs().max() < 1e-3


def _ring_rank(rank, world, init, q, k, v, queue):
    from relay.parallel.groups import RankInfo, destroy_groups, init_groups
    from relay.parallel.layout import ParallelLayout
    from relay.parallel.xdit import make_attention

    torch.set_num_threads(1)
    groups = init_groups(ParallelLayout(ring_degree=world), RankInfo(rank=rank, local_rank=rank, world_size=world,
                                                                     init_method=init), device_type="cpu")
    try:
        size = q.shape[1] // world
        part = slice(rank * size, (rank + 1) * size)
        attention = make_attention(torch.device("cpu"), padded=False)
        out = attention(None, q[:, part].contiguous(), k[:, part].contiguous(), v[:, part].contiguous())
        # numpy, not a tensor: a tensor travels as a shared fd this process must outlive
        queue.put((rank, out.float().numpy(), attention.attn_processor.chosen[(q.dtype, q.shape[-1])][0]))
    finally:
        destroy_groups(groups)


def test_ring_attention_in_bf16_on_gloo_stays_within_bf16_error(tmp_path):
    """4 ranks of ring attention on bf16 inputs against the fp32 attention of the whole sequence.

    The bound: one-process bf16 attention (the CPU flash kernel) already differs from fp32 by
    its bf16 rounding; the ring adds only the rounding of each block's output to bf16 before
    the merge (the merge itself and the LSE stay fp32): at most half a bf16 ulp of the output's
    scale more, 2^-8 of it. So the ring's largest error may exceed the one-process one by
    2^-8 * max|out|, and its mean error by a quarter. A merge fed bf16 LSEs (yunchang's
    torch-flash path) breaks both."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    batch, seq, heads, dim, world = 1, 1024, 2, 64, 4

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    q, k = (rms(torch.randn(batch, seq, heads, dim)) * 3.0 for _ in range(2))  # peaked, like Wan's qk-norm
    v = torch.randn(batch, seq, heads, dim)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    single = (kernels.KERNELS["cpu-flash"](qb, kb, vb)[0].float() - ref).abs()

    context = mp.get_context("spawn")
    queue = context.Queue()
    init = f"file://{tmp_path}/rendezvous"
    procs = [context.Process(target=_ring_rank, args=(r, world, init, qb, kb, vb, queue), daemon=True)
             for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        results = sorted((queue.get(timeout=240) for _ in range(world)), key=lambda r: r[0])
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert {name for _, _, name in results} == {"cpu-flash"}
    ring = (torch.cat([torch.from_numpy(out) for _, out, _ in results], dim=1) - ref).abs()
    worst, mean = single.max().item() + 2**-8 * ref.abs().max().item(), 1.25 * single.mean().item()
    assert ring.max() <= worst and ring.mean() <= mean, (ring.max(), ring.mean(), worst, mean)
    blocks = list(zip(kb.chunk(world, dim=1), vb.chunk(world, dim=1), strict=True))
    bf16_lse = (_merge(blocks, qb, kernels.KERNELS["cpu-flash"], lse_dtype=torch.bfloat16) - ref).abs()
    assert bf16_lse.max() > worst and bf16_lse.mean() > mean  # the defect an fp32 LSE removes


def test_the_attention_path_with_the_cuda_kernel_choice_takes_no_cpu_tensor(tiny_models):
    """A Wan transformer on the meta device whose self-attention runs the way a CUDA rank's does
    (the family's processor, the kernel chosen by CUDA's rules): any CPU tensor made inside the
    forward -- a mask, RoPE tables, an LSE -- meets a meta tensor and raises. (The collectives
    around it need a real device; the device check runs them.)"""
    from diffusers import WanTransformer3DModel

    from relay.engine.models import get_spec
    from relay.parallel.xdit import KernelChoice

    model = WanTransformer3DModel.from_pretrained(tiny_models["t2v"], subfolder="transformer",
                                                  torch_dtype=torch.bfloat16).to("meta").eval()
    config = model.config
    inputs = {"hidden_states": torch.randn(1, config.in_channels, 2, 8, 8, device="meta", dtype=torch.bfloat16),
              "timestep": torch.tensor([500], device="meta"),
              "encoder_hidden_states": torch.randn(1, 16, config.text_dim, device="meta", dtype=torch.bfloat16),
              "return_dict": False}
    plan = get_spec("wan2.2").sequence_parallel()
    choice = KernelChoice(torch.device("meta"), padded=False)
    for attn in plan.self_attention(model):
        attn.set_processor(plan.processor(lambda q, k, v: choice(q, k, v)[0]))
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape
        assert [name for name, _ in choice.chosen.values()] == ["cuda-flash"]
        leaked = dict(inputs, timestep=torch.tensor([500]))  # the check can fail: a CPU tensor raises
        with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
            model(**leaked)


def test_the_attention_flag_lists_every_kernel():
    """``--attention``'s choices (repeated in the flags: they import no torch) are the kernels."""
    from relay.cli.flags import ATTENTION_CHOICES

    assert ATTENTION_CHOICES == (kernels.AUTO, kernels.LIBRARY, *kernels.KERNELS)
