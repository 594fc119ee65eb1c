"""Benchmark (not a test): per-step time of one request on 1, 2 and 4 processes, and -- when a
CUDA device is present -- one forward of the full-size A14B expert at 480p and 720p.

    .venv/bin/python bench/parallel.py [--sizes 1,2,4] [--json out.json]

CPU part: the tiny T2V model through the real worker group (gloo), median step time per layout,
interleaved over rounds. GPU part: a ``WanTransformer3DModel`` with the T2V-A14B config and
random bf16 weights; seconds per forward, achieved TFLOP/s (FLOPs from the config, see
``engine.flops``), the matmul peak measured on the same GPU, MFU, peak memory, attention backend.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
            rope_max_seq_len=1024)


def cpu_layouts(sizes: list[int]):
    from parallel.layout import ParallelLayout

    out = []
    for n in sizes:
        if n == 1:
            out.append(("1 process", ParallelLayout()))
            continue
        out.append((f"ulysses={n}", ParallelLayout(ulysses_degree=n)))
        out.append((f"ring={n}", ParallelLayout(ring_degree=n)))
        if n >= 2:
            out.append((f"cfg=2 x ulysses={n // 2}" if n > 2 else "cfg=2",
                        ParallelLayout(cfg_degree=2, ulysses_degree=n // 2)))
        out.append((f"ulysses={n} fsdp={n}", ParallelLayout(ulysses_degree=n, fsdp_degree=n)))
    return out


def bench_cpu(sizes: list[int], rounds: int) -> list[dict]:
    from engine.model_info import read_model_info
    from engine.request import GenerationRequest, resolve_request
    from engine.tiny import default_model_dir
    from launch.local import spawn_group
    from launch.worker import GenerateJob

    model = default_model_dir("t2v")
    info = read_model_info(model)
    request = resolve_request(GenerationRequest(prompt="a red robot", height=128, width=128, frames=17,
                                                steps=8, seed=0, guidance=4.0, guidance_low=3.0), info)
    rows = {name: [] for name, _ in cpu_layouts(sizes)}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, layout in cpu_layouts(sizes):
                job = GenerateJob(model=str(model), request=request.to_dict(with_image=True), layout=layout,
                                  dtype="fp32", device_type="cpu", output=f"{tmp}/x.npy", quiet=True)
                # Every layout, the 1-process baseline included, runs through the same launcher.
                report = spawn_group(job, layout.world_size, timeout_s=600)[0]
                rows[name].append(statistics.median(report["step_s"][1:]))  # first step warms up
    tokens = 5 * 8 * 8
    print(f"tiny T2V, {request.width}x{request.height}x{request.frames} ({tokens} tokens), "
          f"{request.steps} steps, CFG, fp32, CPU {platform.processor() or platform.machine()}, {rounds} rounds")
    print(f"{'layout':<24}{'median s/step':>14}{'vs 1 process':>14}")
    base = statistics.median(rows["1 process"])
    results = []
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:<24}{med:>14.4f}{base / med:>13.2f}x")
        results.append({"layout": name, "step_s": values, "median_step_s": med})
    return results


def matmul_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 matmul throughput measured on this GPU (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def bench_gpu(repeats: int) -> list[dict]:
    from diffusers import WanTransformer3DModel

    from engine.flops import transformer_flops, video_tokens

    peak = matmul_peak_tflops()
    with torch.device("meta"):
        model = WanTransformer3DModel(**A14B)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval().requires_grad_(False)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    results = []
    print(f"{torch.cuda.get_device_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s")
    print(f"{'size':<10}{'tokens':>8}{'s/forward':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
    for name, (h, w) in (("480p", (480, 832)), ("720p", (720, 1280))):
        tokens = video_tokens(A14B, height=h, width=w, frames=81)
        latents = torch.randn(1, 16, 21, h // 8, w // 8, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
        t = torch.tensor([500], device="cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        flops = transformer_flops(A14B, tokens)["total"]
        achieved = flops / seconds / 1e12
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name:<10}{tokens:>8}{seconds:>11.3f}{achieved:>9.0f}{achieved / peak:>7.1%}{peak_gib:>10.1f}")
        results.append({"size": name, "tokens": tokens, "forward_s": times, "tflops": achieved,
                        "matmul_peak_tflops": peak, "mfu": achieved / peak, "peak_gib": peak_gib,
                        "attention": "torch SDPA (diffusers native dispatch)"})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4", help="process counts for the CPU part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-repeats", type=int, default=5)
    parser.add_argument("--json", help="write raw results here")
    args = parser.parse_args()
    results = {"machine": platform.platform(), "torch": torch.__version__}
    results["cpu"] = bench_cpu([int(n) for n in args.sizes.split(",")], args.rounds)
    if torch.cuda.is_available():
        results["gpu"] = bench_gpu(args.gpu_repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
