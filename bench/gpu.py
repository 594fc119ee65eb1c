"""``relay bench gpu`` (CUDA only): one forward of the full-size Wan 2.2 A14B expert
(``WanTransformer3DModel`` with the T2V-A14B config, random weights, bf16) at 480p and 720p x 81
frames, batch 1, 512 text tokens.

Reported per size and variant: seconds per forward (median of ``--rounds`` after a warm-up),
achieved TFLOP/s, the dense matmul peak measured on the same GPU in the same dtype (an
``n x n`` matmul, default n = 8192), MFU = achieved / measured peak, peak allocated memory, and
the attention actually used: the diffusers attention backend asked for and the attention
kernels seen in a profiled forward (``aten::_scaled_dot_product_flash_attention``, cuDNN,
``flash_attn``, ...). Variants: ``--attention`` lists attention backends to measure side by
side: ``relay`` (what a Relay rank runs: the self-attention on the kernel
:func:`parallel.kernels.choose` picks for this GPU, the text cross-attention on torch SDPA) and
diffusers' backends (``native`` = torch SDPA; ``auto``: ``relay``, ``native`` and every
installed non-hub backend); ``--compile`` adds a
``torch.compile``'d run of each. xfuser's attention is not involved: it serves sequence
parallelism (``relay bench parallel``), not a 1-GPU forward.

FLOPs are computed from the config by :func:`engine.models.wan.flops.transformer_flops`: 2 FLOPs per
multiply-add of every matmul (q/k/v/out projections, self-attention scores and weighted sum
over S video tokens, cross-attention over the 512 text tokens, the two FFN matmuls, patch
embedding and output projection); norms, rotary, softmax and activations are not counted.

``--device cpu --config tiny`` runs the same code on the tiny architecture on the CPU (the test
mode of the arithmetic); the figures then mean nothing.
"""

from __future__ import annotations

from relay.bench import common

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
            rope_max_seq_len=1024)
#: The embedded tiny model's transformer (:mod:`engine.tiny`), for the CPU test mode.
TINY = dict(A14B, num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, rope_max_seq_len=32)
#: name -> (config, {size name: (height, width, frames)}, matmul size of the peak measurement)
CONFIGS = {
    "a14b": (A14B, {"480p": (480, 832, 81), "720p": (720, 1280, 81)}, 8192),
    "tiny": (TINY, {"32x32x5": (32, 32, 5), "64x64x9": (64, 64, 9)}, 512),
}
TEXT_TOKENS = 512
#: The ``--attention`` backend that runs Relay's own kernel choice.
RELAY = "relay"
#: Backends ``--attention auto`` tries besides ``relay`` and ``native`` (hub kernels need a download: never).
AUTO_BACKENDS = ("_native_cudnn", "_native_flash", "flash", "_flash_3", "sage")
_ATTENTION_OPS = ("scaled_dot_product", "flash_attn", "flash_attention", "cudnn_attention",
                  "efficient_attention", "sageattn", "xformers", "flex_attention", "xfuser")


def add_arguments(parser) -> None:
    """The GPU bench's flags."""
    parser.add_argument("--config", choices=tuple(CONFIGS), default="a14b",
                        help="a14b: the full-size expert (default); tiny: the CPU test mode")
    parser.add_argument("--sizes", help="comma-separated sizes (a14b: 480p,720p; tiny: 32x32x5,64x64x9); "
                                        "default all, smoke the first")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--attention", default="relay,native",
                        help="comma-separated attention backends to compare: relay (Relay's chosen kernel) "
                             "and diffusers' (native = torch SDPA; _native_cudnn, _native_flash, flash, "
                             "_flash_3, sage, ...), or auto (default relay,native)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure with regional compilation (each block torch.compile'd): speed-up and output difference")
    parser.add_argument("--matmul-size", type=int, help="n of the n x n peak matmul (a14b 8192, tiny 512)")


def skip_reason(args) -> str | None:
    """``no CUDA device`` unless a CUDA device is present or the CPU test mode is asked for."""
    import torch

    if args.device and not args.device.startswith("cuda"):
        return None if args.config == "tiny" else "the A14B forward needs a CUDA device (CPU test mode: --config tiny)"
    return None if torch.cuda.is_available() else "no CUDA device"


def flops_per_forward(config: dict, height: int, width: int, frames: int) -> tuple[int, float]:
    """Tokens and FLOPs of one forward at ``height x width x frames`` (see the module doc)."""
    from relay.engine.models.wan.flops import transformer_flops, video_tokens

    tokens = video_tokens(config, height=height, width=width, frames=frames)
    return tokens, transformer_flops(config, tokens, text_tokens=TEXT_TOKENS)["total"]


def utilisation(flops: float, seconds: float, peak_tflops: float) -> dict:
    """Achieved TFLOP/s and MFU (achieved / measured peak) of ``flops`` done in ``seconds``."""
    achieved = flops / seconds / 1e12
    return {"tflops": achieved, "mfu": achieved / peak_tflops}


#: Seconds of full-load matmuls before the peak is timed: a GPU idling at low clocks takes a
#: while to reach its boost clock (30 ms of warm-up overstated MFU), and timing then is fair.
PEAK_WARMUP_S = 2.0


def sm_clock_mhz(device) -> int | None:
    """The GPU's current SM clock in MHz (``None`` on a CPU or without NVML)."""
    import torch

    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # noqa: BLE001 - NVML (pynvml) is optional
        return None


def matmul_peak_tflops(device, dtype, n: int, repeats: int = 20, *, warmup_s: float = PEAK_WARMUP_S) -> dict:
    """Dense ``n x n`` matmul throughput of ``device`` in ``dtype`` (the MFU denominator).

    Runs matmuls at full load for ``warmup_s`` first (clocks up), then times three rounds of
    ``repeats`` and keeps the fastest; reports the SM clock before the warm-up and after.

    Returns:
        ``{"tflops", "rounds_tflops", "warmup_s", "clock_mhz_idle", "clock_mhz_loaded"}``.
    """
    import time

    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def matmuls(count: int) -> None:
        for _ in range(count):
            torch.matmul(a, b, out=out)

    idle = sm_clock_mhz(device)
    began = time.perf_counter()
    matmuls(3)  # kernel selection
    while time.perf_counter() - began < warmup_s:
        common.timed(lambda: matmuls(repeats), device)
    loaded = sm_clock_mhz(device)
    rounds = [2 * n**3 * repeats / common.timed(lambda: matmuls(repeats), device)[0] / 1e12 for _ in range(3)]
    return {"tflops": max(rounds), "rounds_tflops": rounds, "warmup_s": time.perf_counter() - began,
            "clock_mhz_idle": idle, "clock_mhz_loaded": loaded}


def backend_problem(name: str, device) -> str | None:
    """Why the attention backend ``name`` (``relay`` or diffusers') cannot run here, or ``None``."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    if name == RELAY:
        return None
    try:
        backend = AttentionBackendName(name)
    except ValueError:
        return "unknown to diffusers"
    if name.endswith("_hub"):
        return "hub kernels need a download"
    if name.startswith("_native_") and name not in ("_native_math",) and device.type != "cuda":
        return "CUDA only"
    try:
        _check_attention_backend_requirements(backend)
    except RuntimeError as exc:
        return str(exc).split(".")[0]
    return None


def attention_backends(spec: str, device) -> list[str]:
    """The backends to measure: the comma-separated ``spec``; ``auto`` = ``native`` plus every
    backend of :data:`AUTO_BACKENDS` usable here."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["auto"]:
        return [RELAY, "native"] + [name for name in AUTO_BACKENDS if backend_problem(name, device) is None]
    known = {member.value for member in AttentionBackendName} | {RELAY}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise common.SettingError(f"--attention: unknown backend {', '.join(unknown)}; diffusers has "
                         f"{', '.join(sorted(known))}")
    return names


def attention_ops(forward) -> list[str]:
    """Runs ``forward()`` under the profiler; returns the attention ops it dispatched, the most
    specific first (``aten::_scaled_dot_product_flash_attention`` rather than the SDPA wrapper)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    names = sorted({event.key for event in prof.key_averages()
                    if any(part in event.key.lower() for part in _ATTENTION_OPS)})
    specific = [name for name in names if name != "aten::scaled_dot_product_attention"]
    return specific or names


def build_model(config: dict, device, dtype):
    """A ``WanTransformer3DModel`` with ``config`` and random weights (diffusers' own init),
    created directly in ``dtype`` on ``device`` (no full-precision copy of 14B parameters), with
    the modules diffusers keeps in fp32 when loading in half precision kept in fp32 too."""
    import torch
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name.split(".") for part in keep):
                param.data = param.data.float()
    return model.eval().requires_grad_(False)


def model_inputs(config: dict, height: int, width: int, frames: int, device, dtype) -> dict:
    """Latents, text states and a timestep for one forward at ``height x width x frames``."""
    import torch

    latent_frames = (frames - 1) // 4 + 1
    return {"hidden_states": torch.randn(1, config["in_channels"], latent_frames, height // 8, width // 8,
                                         device=device, dtype=dtype),
            "timestep": torch.tensor([500], device=device),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config["text_dim"], device=device, dtype=dtype),
            "return_dict": False}


def compile_blocks(model) -> None:
    """Regional compilation: each transformer block is compiled (one graph serves all of them,
    as they share their code), the rest of the model stays eager -- seconds to compile instead
    of minutes for the whole model."""
    for block in model.blocks:
        block.compile(dynamic=False)


def uncompile_blocks(model) -> None:
    """Undoes :func:`compile_blocks`."""
    import torch

    for block in model.blocks:
        block._compiled_call_impl = None
    torch._dynamo.reset()


def measure(model, inputs: dict, *, device, backend: str, compiled: bool, repeats: int,
            reference=None) -> dict:
    """Seconds per forward of one variant (after a warm-up that also finds the attention ops);
    ``reference``: the eager output, for the compiled variant's ``max_abs_diff``."""
    import torch

    local = None
    if backend == RELAY:  # the model's own processors, self-attention on Relay's kernel
        from relay.engine.models import get_spec
        from relay.parallel import kernels
        from relay.parallel.sequence import LocalAttention

        model.reset_attention_backend()
        choice = kernels.choose(device, inputs["hidden_states"].dtype, model.config.attention_head_dim)
        local = LocalAttention(model, get_spec("wan2.2").sequence_parallel(), choice.kernel)
    else:
        model.set_attention_backend(backend)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if compiled:
        torch._dynamo.reset()
        compile_blocks(model)
    try:
        with torch.no_grad():
            first_s, output = common.timed(lambda: model(**inputs), device)  # includes compilation
            ops = attention_ops(lambda: model(**inputs))
            times = [common.timed(lambda: model(**inputs), device)[0] for _ in range(repeats)]
    finally:
        if compiled:
            uncompile_blocks(model)
        if local is not None:
            local.remove()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"backend": backend if local is None else f"{RELAY}:{local.kernel.name}", "compiled": compiled, "first_call_s": first_s, "forward_s": times,
           "attention_ops": ops, "peak_gib": peak, "output": output[0] if isinstance(output, tuple) else output}
    if reference is not None:
        row["max_abs_diff"] = float((row["output"].float() - reference.float()).abs().max())
        row["reference_max_abs"] = float(reference.float().abs().max())
    return row


def _setup(args) -> dict:
    """Device, architecture, sizes, backends, peak matmul size and dtype of this run."""
    from relay.engine.loader import DTYPES

    device = common.resolve_device(args.device or "cuda")
    config, all_sizes, default_n = CONFIGS[args.config]
    names = [s.strip() for s in args.sizes.split(",")] if args.sizes else list(all_sizes)[: 1 if args.smoke else None]
    unknown = [name for name in names if name not in all_sizes]
    if unknown:
        raise common.SettingError(f"--sizes: unknown {', '.join(unknown)}; {args.config} has {', '.join(all_sizes)}")
    backends = attention_backends(args.attention, device)
    if not backends:
        raise common.SettingError("--attention names no backend")
    return {"device": device, "config": config, "sizes": {name: all_sizes[name] for name in names},
            "backends": backends, "n": args.matmul_size or default_n, "dtype": DTYPES[args.dtype]}


def run(args) -> common.BenchResult:
    """Measures the peak, builds the model once, then every size x backend x (eager, compiled).

    Returns:
        Raw forward times per variant and the summary rows (s/forward, TFLOP/s, MFU, memory,
        attention used). A backend that cannot run here gets a row with the reason.
    """
    setup = _setup(args)
    device, dtype = setup["device"], setup["dtype"]
    repeats = common.rounds(args, smoke=1, full=5)
    measured = matmul_peak_tflops(device, dtype, setup["n"], warmup_s=PEAK_WARMUP_S if device.type == "cuda" else 0.2)
    peak = measured["tflops"]
    model = build_model(setup["config"], device, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    rows = _measure_all(model, setup, compile_too=args.compile, repeats=repeats, peak=peak)
    settings = {"config": args.config, "architecture": setup["config"], "dtype": args.dtype, "device": str(device),
                "sizes": setup["sizes"], "text_tokens": TEXT_TOKENS, "batch": 1, "attention": setup["backends"],
                "compile": bool(args.compile), "repeats": repeats, "matmul_size": setup["n"],
                "smoke": bool(args.smoke), "torch_sdpa_enabled": _sdpa_flags()}
    summary = {"matmul_peak_tflops": peak, "matmul_peak": measured, "weights_gib": weights_gib,
               "rows": [{k: v for k, v in row.items() if k != "forward_s"} for row in rows],
               "flops_method": "engine.models.wan.flops.transformer_flops: 2 x multiply-adds of every matmul, from the config"}
    raw = {"forward_s": {_variant(row): row.get("forward_s") for row in rows}}
    return common.BenchResult(settings=settings, raw=raw, summary=summary, device=str(device),
                              table=_table(settings, summary, device))


def _measure_all(model, setup: dict, *, compile_too: bool, repeats: int, peak: float) -> list[dict]:
    """Every size x backend (x eager, compiled); diffusers' active attention backend is restored."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    device, dtype, config = setup["device"], setup["dtype"], setup["config"]
    active = _AttentionBackendRegistry._active_backend
    rows = []
    try:
        for size, (height, width, frames) in setup["sizes"].items():
            tokens, flops = flops_per_forward(config, height, width, frames)
            inputs = model_inputs(config, height, width, frames, device, dtype)
            for backend in setup["backends"]:
                base = {"size": size, "tokens": tokens, "flops": flops, "backend": backend, "compiled": False}
                problem = backend_problem(backend, device)
                if problem:
                    rows.append({**base, "error": problem})
                    continue
                eager = _variant_row(base, model, inputs, device=device, repeats=repeats, peak=peak)
                rows.append(eager)
                if compile_too:
                    rows.append(_variant_row({**base, "compiled": True}, model, inputs, device=device,
                                             repeats=repeats, peak=peak, reference=eager.get("output")))
                    if "median_s" in eager and "median_s" in rows[-1]:
                        rows[-1]["speedup"] = eager["median_s"] / rows[-1]["median_s"]
            for row in rows:
                row.pop("output", None)
            del inputs
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    return rows


def _variant_row(base: dict, model, inputs: dict, *, device, repeats: int, peak: float, reference=None) -> dict:
    """One measured variant as a summary row; a failure becomes the row's ``error``."""
    try:
        result = measure(model, inputs, device=device, backend=base["backend"], compiled=base["compiled"],
                         repeats=repeats, reference=reference)
    except Exception as exc:  # noqa: BLE001 - one failing backend must not end the run
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return {**base, "error": f"{type(exc).__name__}: {first_line[:120]}"}
    seconds = common.median(result["forward_s"])
    return {**base, **result, "median_s": seconds, **utilisation(base["flops"], seconds, peak)}


def _variant(row: dict) -> str:
    return f"{row['size']}/{row['backend']}{'/compiled' if row['compiled'] else ''}"


def _sdpa_flags() -> dict:
    import torch

    flags = {}
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        check = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        flags[name] = bool(check()) if check else None
    return flags


def _table(settings: dict, summary: dict, device) -> str:
    rows = []
    for row in summary["rows"]:
        label = [row["size"], row["tokens"], row["backend"] + (" +compile" if row["compiled"] else "")]
        if "error" in row:
            rows.append(label + [None, None, None, None, f"not run: {row['error']}", None])
            continue
        memory = None if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        compiled = ""
        if row["compiled"] and "speedup" in row:
            compiled = f"{row['speedup']:.2f}x eager, max |diff| {row['max_abs_diff']:.2g}"
        rows.append(label + [f"{row['median_s']:.4g}", f"{row['tflops']:.4g}", f"{row['mfu']:.1%}", memory,
                             ", ".join(row["attention_ops"]) or "none seen", compiled])
    clocks = summary["matmul_peak"]
    clock = (f", SM clock {clocks['clock_mhz_idle']} -> {clocks['clock_mhz_loaded']} MHz"
             if clocks.get("clock_mhz_loaded") else "")
    title = (f"gpu: {settings['config']} expert forward, {settings['dtype']}, batch 1, {settings['text_tokens']} "
             f"text tokens | {common.device_name(device)} | measured {settings['dtype']} matmul peak "
             f"{summary['matmul_peak_tflops']:.4g} TFLOP/s (n={settings['matmul_size']}, after "
             f"{clocks['warmup_s']:.1f}s of warm-up{clock}) | weights "
             f"{summary['weights_gib']:.3g} GiB | {settings['repeats']} repeat(s)")
    notes = [("TFLOP/s: FLOPs from the config (engine.models.wan.flops.transformer_flops: 2 x every matmul multiply-add, "
              "elementwise ops not counted) / median s; MFU = TFLOP/s / measured matmul peak"),
             "attention: the backend asked for (relay:KERNEL: Relay's choice for this GPU) -> the attention ops "
             "seen in a profiled forward"]
    headers = ["size", "tokens", "attention backend", "s/forward", "TFLOP/s", "MFU", "peak GiB", "attention ops",
               "compiled"]
    return common.format_table(headers, rows, title=title, notes=notes, align="lrlrrrrll")
