"""Relay's benchmarks (never timed tests), run by ``relay bench NAME`` (or ``relay bench all``).

Each bench prints a table and writes one JSON file (machine, device name, library versions,
settings, raw timings, summary) into a user folder (:func:`bench.common.results_dir`;
``--results DIR``, e.g. ``bench/results`` to record a run in the repository; ``--json PATH``
names the file). ``--smoke`` picks the smallest settings, so that every bench also runs on a CPU in CI.

Registry: :data:`BENCHES` maps a bench's name to ``(module, description)``. A module that does
not exist yet is a registered slot: ``relay bench NAME`` says it is not built yet and
``relay bench all`` passes over it. Adding a bench means writing its module; the command line
picks it up from here.

A bench module defines three functions (``args`` is the parsed ``argparse.Namespace``; the
common flags ``smoke``, ``rounds``, ``results``, ``json``, ``device`` are always present):

* ``add_arguments(parser: argparse.ArgumentParser) -> None`` -- the bench's own flags, each with
  a default (``relay bench all`` runs a bench on its defaults). Called whenever the ``relay``
  parser is built, so a bench module must import nothing heavy (torch, diffusers, grpc) at
  module level.
* ``skip_reason(args) -> str | None`` -- why the bench cannot run on this machine (``"no CUDA
  device"``), or ``None``. A skipped bench prints ``skipped: <reason>``, exits 0, writes nothing.
* ``run(args) -> bench.common.BenchResult`` -- runs the bench and returns its settings (with
  ``"smoke": bool``), raw timings, summary and printed table; the command line prints the table
  and writes the JSON. A setting that cannot work raises ``bench.common.SettingError`` (exit 2).

Shared helpers (device names, versions, statistics, the table) are in :mod:`bench.common`.
"""

from __future__ import annotations

#: name -> (module, one-line description), in the order ``relay bench all`` runs them.
BENCHES: dict[str, tuple[str, str]] = {
    "engine": ("relay.bench.engine",
               "Relay's engine vs diffusers' WanPipeline: same model, one process, interleaved rounds"),
    "parallel": ("relay.bench.parallel",
                 "per-step time of each parallel layout that fits (1/2/4 processes on CPU)"),
    "stages": ("relay.bench.stages", "expert stages on separate Ray worker groups: overlap vs no overlap vs "
                               "fused replicas, requests/min, achieved/ideal overlap, utilisation"),
    "serve": ("relay.bench.serve",
              "gRPC: time to first event, events/s, 50 concurrent Generate streams"),
    "scaling": ("relay.bench.scaling", "the real engine at 1/2/4/... devices on Ray worker groups, measured vs "
                                 "the layout planner (CPU: processes and the tiny model)"),
    "cli": ("relay.bench.cli",
            "how fast relay --help, relay --version and every relay X --help answer (whole processes)"),
    "lora": ("relay.bench.lora", "LoRA fuse / switch / unfuse on a full-size A14B block (x40 per expert), "
                                 "and the planner's s/video of --preset lightning vs the 40-step default"),
    "cache": ("relay.bench.caches", "feature caches (first-block, TaylorSeer, ...) vs none: forwards skipped per "
                                    "expert, time ratio and max difference, interleaved rounds"),
    "vae": ("relay.bench.vae", "VAE decode split by rows over 1/2/4 ranks (--vae-parallel) and tiled on one: "
                               "seconds, peak memory per rank, difference to one rank"),
    "simulator": ("relay.bench.simulator", "relay simulate vs the real scheduler on sleep-based stand-in groups: "
                                           "throughput and p95 within a tenth, overhead per call, staged efficiency"),
    "gpu": ("relay.bench.gpu",
            "full-size A14B expert forward in bf16 at 480p/720p: s/forward, TFLOP/s, MFU, memory (CUDA only)"),
}
