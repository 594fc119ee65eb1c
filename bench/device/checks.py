"""Single-GPU checks of the CUDA path, one JSON document (``bench/device/check.sh`` runs this).

Each check records ``status`` (``pass``, ``fail`` or ``skip``) and its figures:

* ``kernels``: every CUDA kernel of :mod:`parallel.kernels` built for this GPU in every dtype it
  takes, against fp32 attention and the exact log-sum-exp (the LSE must come out of the op in
  fp32), and the check each rank runs before choosing it (:func:`parallel.kernels.verify`);
* ``kernels_at_sp_shapes``: milliseconds and TFLOP/s of each kernel at the shapes one rank
  sees for A14B at 1280x720, 81 frames (75,600 tokens, 40 heads of 128): Ulysses 8 (all tokens,
  5 heads) and one ring-8 block (9,450 x 9,450 tokens, 40 heads), beside the kernel
  :func:`parallel.kernels.choose` picks for this GPU (``chosen_vs_fastest``: its time over the
  fastest's; 1.0 when the choice is the fastest);
* ``parity``: tiny T2V, I2V and TI2V models generated on the CPU in fp32 and on this GPU in
  fp32 and bf16 (noise is drawn on the CPU, so the seeds agree): the largest pixel difference;
* ``nccl_world1``: the 1-rank NCCL process-group path and the sequence-parallel attention on
  it in bf16 and fp32 (fp32 used to die at the flash op);
* ``offload_switch``: ``--offload``'s expert switch with and without the prefetch
  (:meth:`engine.loader.LoadedModel.prefetch`): two experts of 8 full-size A14B blocks (bf16,
  random), the high-noise expert's last forward then the low-noise expert's first, at 480p,
  against the same two forwards with no switch; the switch's cost each way, and the low-noise
  output with the prefetch equal to the one without.

Run: ``python bench/device/checks.py --out checks.json`` (``--device cpu`` for a dry run of the
plumbing on a machine without a GPU: the GPU checks report ``skip``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

#: A14B at 1280x720, 81 frames: 21 x 45 x 80 latent patches; 40 heads of 128.
TOKENS_720P, HEADS, HEAD_DIM = 21 * 45 * 80, 40, 128
SP_SHAPES = {"ulysses8": (TOKENS_720P, TOKENS_720P, HEADS // 8), "ring8_block": (TOKENS_720P // 8, TOKENS_720P // 8, HEADS)}
PARITY = dict(height=64, width=64, frames=9, steps=4, seed=3, guidance=4.0, guidance_low=3.0, shift=5.0)


def _cuda_kernels():
    """The CUDA kernels installed here and built for this GPU's architecture."""
    from relay.parallel.kernels import KERNELS, _installed

    capability = tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    return [k for k in KERNELS.values() if k.device == "cuda" and _installed(k.name) and k.runs_on(capability)]


def check_kernels(device) -> dict:
    from relay.parallel.kernels import verify

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 4, HEAD_DIM, device=device) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    ref_lse = torch.logsumexp(torch.einsum("bshd,bthd->bhst", q, k) / HEAD_DIM ** 0.5, dim=-1)
    rows, ok = {}, True
    for kernel in _cuda_kernels():
        for dtype in kernel.dtypes:
            name = f"{kernel.name}/{str(dtype).removeprefix('torch.')}"
            try:
                out, lse = kernel.raw(q.to(dtype), k.to(dtype), v.to(dtype))  # the LSE in the op's own dtype
            except Exception as exc:  # noqa: BLE001 - one kernel's failure is its row
                rows[name] = {"error": str(exc).splitlines()[0][:200]}
                ok = ok and kernel.name == "cuda-cudnn"  # cuDNN attention may be missing
                continue
            out_err = float((out.float() - ref).abs().max())
            lse_err = float((lse - ref_lse).abs().max())
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            refused = verify(kernel, device, dtype, HEAD_DIM)  # the rank's own check must pass it too
            good = lse.dtype == torch.float32 and out_err < tol and lse_err < 10 * tol and refused is None
            ok = ok and good
            rows[name] = {"out_max_err": out_err, "lse_max_err": lse_err, "lse_dtype": str(lse.dtype),
                          "verify": refused or "pass", "ok": good}
    return {"status": "pass" if ok else "fail", "kernels": rows}


def check_kernels_at_sp_shapes(device, repeats: int = 5) -> dict:
    from relay.parallel.kernels import choose

    rows = {}
    for shape, (sq, sk, heads) in SP_SHAPES.items():
        q = torch.randn(1, sq, heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, sk, heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * sq * sk * heads * HEAD_DIM
        for kernel in _cuda_kernels():
            if torch.bfloat16 not in kernel.dtypes:
                continue
            try:
                kernel(q, k, v)
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    kernel(q, k, v)
                end.record()
                torch.cuda.synchronize(device)
                ms = start.elapsed_time(end) / repeats
                rows[f"{shape}/{kernel.name}"] = {"ms": ms, "tflops": flops / ms / 1e9}
            except Exception as exc:  # noqa: BLE001 - one kernel's failure is its row
                rows[f"{shape}/{kernel.name}"] = {"error": str(exc).splitlines()[0][:200]}
        del q, k, v
        torch.cuda.empty_cache()
    choice = choose(device, torch.bfloat16, HEAD_DIM)
    fastest, chosen_vs_fastest = against_choice(rows, choice.name)
    return {"status": "pass" if all(fastest.values()) else "fail", "timings": rows, "fastest": fastest,
            "chosen": choice.name, "passed_over": choice.passed_over, "chosen_vs_fastest": chosen_vs_fastest}


def against_choice(rows: dict, chosen: str) -> tuple[dict, dict]:
    """``({shape: fastest kernel}, {shape: chosen kernel's ms / fastest's})`` of the timing rows
    (``"shape/kernel": {"ms": ...} | {"error": ...}``); a ratio above 1 is how much slower the
    choice ran than the fastest kernel."""
    fastest, ratio = {}, {}
    for shape in SP_SHAPES:
        timed = {n.split("/", 1)[1]: r["ms"] for n, r in rows.items() if n.startswith(f"{shape}/") and "ms" in r}
        fastest[shape] = min(timed, key=timed.get) if timed else None
        if timed and chosen in timed:
            ratio[shape] = timed[chosen] / timed[fastest[shape]]
    return fastest, ratio


def check_parity(device, work: Path) -> dict:
    from relay.engine import Engine, GenerationRequest, load_model
    from relay.engine.tiny import make_tiny

    rows, ok = {}, True
    for kind in ("t2v", "i2v", "ti2v"):
        folder = make_tiny(work / kind, kind=kind, seed=0)
        image = None
        if kind != "t2v":
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (120, 60, 200)).save(buffer, "PNG")
            image = buffer.getvalue()
        request = GenerationRequest(prompt="a lighthouse at dusk", image=image, **PARITY)
        reference = Engine(load_model(folder, dtype="fp32", device="cpu")).generate(request)
        for dtype, tol in (("fp32", 1e-3), ("bf16", 0.1)):
            frames = Engine(load_model(folder, dtype=dtype, device=device)).generate(request)
            diff = float(abs(frames.astype("float64") - reference).max())
            rows[f"{kind}/{dtype}"] = {"max_abs_diff": diff, "tolerance": tol, "ok": diff < tol}
            ok = ok and diff < tol
    return {"status": "pass" if ok else "fail", "runs": rows}


def check_nccl_world1(device, work: Path) -> dict:
    import torch.distributed as dist

    from relay.parallel.groups import RankInfo, destroy_groups, init_groups
    from relay.parallel.layout import ParallelLayout
    from relay.parallel.xdit import load, make_attention

    init_groups(ParallelLayout(), RankInfo(rank=0, local_rank=0, world_size=1, init_method=f"file://{work}/rdzv"),
                device_type="cuda")
    rows, ok = {}, True
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method=f"file://{work}/rdzv-nccl", rank=0, world_size=1)
        registry = load().PROCESS_GROUP
        registry.ULYSSES_PG = registry.RING_PG = dist.group.WORLD
        for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
            q, k, v = (torch.randn(1, 512, 8, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
            attention = make_attention(device, padded=False)
            out = attention(None, q, k, v)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)
            err = float((out.float() - ref).abs().max())
            name = attention.attn_processor.chosen[(dtype, HEAD_DIM)][0]
            rows[str(dtype).removeprefix("torch.")] = {"kernel": name, "max_err": err, "ok": err < tol}
            ok = ok and err < tol
    finally:
        destroy_groups()
    return {"status": "pass" if ok else "fail", "attention": rows}


def check_offload_switch(device, work: Path | None = None, *, config: dict | None = None, layers: int = 8,
                         size: tuple[int, int, int] = (480, 832, 81), rounds: int = 3) -> dict:
    """See the module docstring. ``config`` / ``layers`` / ``size`` shrink it for a CPU dry run
    (off CUDA no prefetch starts: the check reports ``skip`` with its figures)."""
    from relay.bench.gpu import A14B, build_model, model_inputs
    from relay.engine.experts import HIGH, LOW
    from relay.engine.loader import LoadedModel

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = dict(config or A14B, num_layers=layers)
    torch.manual_seed(0)
    experts = {name: build_model(config, device, dtype).to("cpu") for name in (HIGH, LOW)}
    if cuda:
        torch.cuda.empty_cache()
    model = LoadedModel(info=None, device=device, dtype=dtype, tokenizer=None, text_encoder=None, vae=None,
                        experts=experts, offload=True)
    inputs = model_inputs(config, *size, device, dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def two_forwards(second: str, prefetch: bool):
        """The high-noise expert's forward, then ``second``'s (asked ahead when ``prefetch``)."""
        model.on_device(HIGH)(**inputs)  # resident and warm before the clock starts
        sync()
        began = time.perf_counter()
        started = model.prefetch(second) if prefetch else False
        model.on_device(HIGH)(**inputs)
        out = model.on_device(second)(**inputs)[0]
        sync()
        return time.perf_counter() - began, started, out

    with torch.no_grad():
        times = {"no_switch": [], "switch": [], "switch_prefetched": []}
        started, outputs = [], {}
        for _ in range(rounds):  # interleaved: the machine's drift lands on every variant alike
            for variant, second, prefetch in (("no_switch", HIGH, False), ("switch", LOW, False),
                                              ("switch_prefetched", LOW, True)):
                seconds, began, out = two_forwards(second, prefetch)
                times[variant].append(seconds)
                if prefetch:
                    started.append(began)
                outputs[variant] = out
    median = {variant: sorted(values)[len(values) // 2] for variant, values in times.items()}
    expert_gib = sum(t.numel() * t.element_size() for t in experts[LOW].parameters()) / 2**30
    same = bool(torch.equal(outputs["switch"], outputs["switch_prefetched"]))
    row = {"expert_gib": expert_gib, "layers": layers, "size": list(size), "variant_seconds": times, "median_s": median,
           "switch_cost_s": median["switch"] - median["no_switch"],
           "prefetched_switch_cost_s": median["switch_prefetched"] - median["no_switch"],
           "prefetch_started": started, "prefetches": dict(model.prefetches), "equal_output": same}
    if not cuda:
        return {"status": "skip", "reason": "no prefetch off CUDA", **row}
    return {"status": "pass" if same and all(started) else "fail", **row}


CHECKS = {"kernels": check_kernels, "kernels_at_sp_shapes": check_kernels_at_sp_shapes,
          "parity": check_parity, "nccl_world1": check_nccl_world1, "offload_switch": check_offload_switch}
NEEDS_WORK = ("parity", "nccl_world1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON document to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", help="comma-separated checks (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = args.only.split(",") if args.only else list(CHECKS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="relay-checks-") as folder:
        for name in names:
            began = time.perf_counter()
            if device.type != "cuda" or not torch.cuda.is_available():
                results[name] = {"status": "skip", "reason": "no CUDA device"}
                continue
            try:
                work = Path(folder) / name
                work.mkdir()
                results[name] = CHECKS[name](device, work) if name in NEEDS_WORK else CHECKS[name](device)
            except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
                results[name] = {"status": "fail", "error": f"{type(exc).__name__}: {exc}"[:500],
                                 "traceback": traceback.format_exc()[-4000:]}
            results[name]["seconds"] = time.perf_counter() - began
            print(f"{name}: {results[name]['status']} ({results[name]['seconds']:.1f}s)", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(r["status"] != "fail" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
