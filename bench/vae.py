"""``relay bench vae``: the VAE decode on 1, 2 and 4 ranks split by rows, and tiled on one.

Each rank count runs in its own fresh gloo process group (``torch.multiprocessing`` spawn, one
process per rank, the CPU threads divided among them), decodes the same random latents
``--rounds`` times through :class:`parallel.vae.RowSplitVAE` (the code ``--vae-parallel`` runs)
and reports the median seconds of the slowest rank, each rank's peak memory above what it held
before (CUDA allocator peak, or sampled resident memory on a CPU) and the max difference to the
single-rank frames. A last row decodes on one rank with diffusers' tiling (``--vae-tiling``).

On a 2-core CPU the 4-rank row shares 2 cores among 4 processes, so its seconds show contention;
the memory column is what the split buys there.
"""

from __future__ import annotations

import os
import tempfile

from relay.bench import common


def add_arguments(parser) -> None:
    """The vae bench's flags."""
    parser.add_argument("--model", help="model directory (default: the embedded tiny T2V-A14B: the Wan 2.1 VAE)")
    parser.add_argument("--latent", default="3x64x64",
                        help="latent FRAMESxHEIGHTxWIDTH (default 3x64x64: 9 frames of 512x512 pixels, beyond one 256-pixel tile)")
    parser.add_argument("--ranks", default="1,2,4", help="rank counts to split over (default 1,2,4)")


def skip_reason(args) -> str | None:
    """Runs everywhere (on CPU with gloo; on CUDA one GPU per rank when there are enough)."""
    return None


def _rank(rank, world, model_dir, shape, rounds, port, device_type, folder, tiled):
    import time

    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKLWan

    from relay.launch.worker import PeakMemory
    from relay.parallel.vae import RowSplitVAE

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae").eval().to(device)
    if tiled:
        vae.enable_tiling()
    split = RowSplitVAE(vae, dist.group.WORLD)
    latents = torch.randn((1, vae.config.z_dim, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    seconds, peaks, video = [], [], None
    with torch.no_grad():
        for _ in range(rounds):
            dist.barrier()
            with PeakMemory(device) as peak:
                began = time.perf_counter()
                video = split.decode(latents) if world > 1 else vae.decode(latents, return_dict=False)[0]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - began)
            peaks.append(peak.bytes)
    torch.save({"seconds": seconds, "peaks": peaks, "video": None if video is None else video.cpu(),
                "measure": peak.measure}, os.path.join(folder, f"{world}-{int(tiled)}-{rank}.pt"))
    dist.destroy_process_group()


def run(args) -> common.BenchResult:
    """Decodes on each rank count ``--rounds`` times (default 3, smoke 1)."""
    import torch
    import torch.multiprocessing as mp

    from relay.engine.tiny import default_model_dir

    try:
        shape = tuple(int(v) for v in args.latent.lower().split("x"))
        ranks = sorted({int(v) for v in args.ranks.split(",")})
        assert len(shape) == 3 and all(v > 0 for v in shape) and ranks and ranks[0] >= 1
    except (ValueError, AssertionError):
        raise common.SettingError("--latent is FRAMESxHEIGHTxWIDTH and --ranks positive integers") from None
    if args.smoke:
        shape, ranks = (2, 8, 8), [1, 2]
    device = common.resolve_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < max(ranks):
        raise common.SettingError(f"--ranks {max(ranks)} needs as many GPUs, found {torch.cuda.device_count()}")
    if shape[1] < max(ranks):
        raise common.SettingError(f"{shape[1]} latent rows cannot be split over {max(ranks)} ranks")
    rounds = common.rounds(args, smoke=1, full=3)
    model_dir = args.model or str(default_model_dir("t2v"))
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        tiles = [] if args.smoke else [(1, True)]
        for index, (world, tiled) in enumerate([(n, False) for n in ranks] + tiles):
            mp.spawn(_rank, args=(world, model_dir, shape, rounds, 29700 + index, device.type, folder, tiled),
                     nprocs=world)
            runs[(world, tiled)] = [torch.load(os.path.join(folder, f"{world}-{int(tiled)}-{r}.pt"))
                                    for r in range(world)]
    base = runs[(1, False)][0]
    base_s = common.median(base["seconds"])
    rows, raw, summary = [], {}, {}
    for (world, tiled), results in runs.items():
        label = "1 (tiled)" if tiled else str(world)
        per_round = [max(r["seconds"][i] for r in results) for i in range(rounds)]
        s = common.median(per_round)
        peak = max(max(r["peaks"]) for r in results)
        diff = float((results[0]["video"] - base["video"]).abs().max())
        raw[label] = {"seconds_per_round": per_round, "peak_bytes_per_rank": [max(r["peaks"]) for r in results]}
        summary[label] = {"decode_s": s, "x_one_rank": s / base_s, "peak_bytes": peak,
                          "peak_vs_one_rank": peak / max(1, max(base["peaks"])), "max_abs_diff": diff}
        rows.append([label, f"{s:.2f}", f"{s / base_s:.2f}", f"{peak / 2**20:.0f}",
                     f"{summary[label]['peak_vs_one_rank']:.2f}", f"{diff:.2g}"])
    frames = (shape[0] - 1) * 4 + 1
    table = common.format_table(
        ["ranks", "decode s", "x 1 rank", "peak MiB/rank", "x 1 rank", "max |diff|"], rows,
        title=f"VAE decode split by rows: latents {shape[0]}x{shape[1]}x{shape[2]} ({frames} frames), "
              f"{rounds} round(s) ({common.device_name(device)})",
        notes=["peak: the busiest rank's memory above what it held before the decode "
               f"({base['measure']}); diff: against the 1-rank frames (the row split is exact, tiles blend)",
               "the ranks share this machine's cores: on a small CPU more ranks mean contention"])
    return common.BenchResult(settings={"model": model_dir, "latent": list(shape), "ranks": ranks, "rounds": rounds,
                                        "smoke": args.smoke}, raw=raw, summary=summary, table=table,
                              device=str(device))
