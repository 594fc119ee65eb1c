"""``relay bench lora``: what a LoRA costs -- fusing it into an expert, unfusing it, switching
sets between requests -- and what the 4-step Lightning recipe saves, priced by the planner.

* **Fuse / unfuse.** A full-size A14B transformer block (dim 5120, FFN 13824, 40 heads, from the
  planner's catalog) in the run dtype, with a random LoRA of ``--rank`` on its ten attention and
  feed-forward layers, goes through the worker's own :class:`engine.lora.ExpertAdapters`: fuse
  (base -> A: host backup + delta), switch (A -> B: exact restore + delta) and unfuse (B -> base:
  exact restore). An expert is 40 such blocks (plus embeddings and head, under 0.3% of its
  parameters and never LoRA targets of the released Lightning files), so the per-expert figure
  is the block's median x 40 -- a host without 28 GiB to spare for one bf16 expert still gets a
  real measurement. The LoRA file's read and conversion is timed once (it is cached after).
* **Lightning vs the default.** The planner's best layout on 8 x H100 and 8 x A6000 at 1280x720,
  81 frames, for the 40-step default and for ``--preset lightning`` (4 Euler steps, guidance 1:
  one forward per step instead of two), side by side.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from relay.bench import common

BLOCKS_PER_EXPERT = 40
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
           "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
PLAN_CASES = (("h100", 8), ("a6000", 8))
PLAN_MODELS = ("t2v-a14b", "i2v-a14b")


def add_arguments(parser) -> None:
    """The lora bench's flags."""
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="weight dtype (default bf16, as an expert is served)")


def skip_reason(args) -> str | None:
    """Runs everywhere (the smoke run uses a small block)."""
    return None


def _block_model(dims: dict, dtype, device):
    import torch
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    class OneBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([WanTransformerBlock(
                dims["dim"], dims["ffn_dim"], dims["heads"], qk_norm="rms_norm_across_heads",
                cross_attn_norm=True, eps=1e-6)])

    with torch.device(device):
        model = OneBlock()
    return model.to(dtype).eval().requires_grad_(False)


def _write_lora(path: Path, model, rank: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for suffix in TARGETS:
        layer = model.get_submodule(f"blocks.0.{suffix}")
        out_features, in_features = layer.weight.shape
        tensors[f"transformer.blocks.0.{suffix}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) / in_features ** 0.5).to(torch.bfloat16)
        tensors[f"transformer.blocks.0.{suffix}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(path))
    return path


def _plans() -> dict:
    from relay.parallel import cost
    from relay.parallel.plan import Planner, rank

    out = {}
    cal = cost.load_calibration()
    for model_name in PLAN_MODELS:
        model = cost.find_model(model_name)
        for gpu_name, gpus in PLAN_CASES:
            gpu = cost.find_gpu(gpu_name)
            row = {}
            for label, preset in (("default", None), ("lightning", "lightning")):
                work = cost.make_workload(model, width=1280, height=720, frames=81, preset=preset)
                best = next(p for p in rank(Planner(work, gpu, cal).enumerate(gpus)) if p.feasible)
                row[label] = {"s_per_video": best.seconds_per_video, "layout": best.describe(), "steps": work.steps,
                              "forwards": sum(work.expert_steps[e] * work.forwards_per_step(e)
                                              for e in work.expert_steps)}
            out[f"{model_name} {gpus}x{gpu_name}"] = row
    return out


def run(args) -> common.BenchResult:
    """Times fuse / switch / unfuse on a full-size block for ``--rounds`` rounds (default 5,
    smoke 2 on a small block) and prices Lightning with the planner."""
    import torch

    from relay.engine.loader import DTYPES
    from relay.engine.lora import ExpertAdapters, LoraChoice, file_identity, read_lora
    from relay.engine.models import get_spec
    from relay.parallel import cost

    spec = get_spec("wan2.2")
    device = common.resolve_device(args.device)
    rounds = common.rounds(args, smoke=2, full=5)
    config = dict(cost.find_model("t2v-a14b").transformer)
    dims = {"dim": config["num_attention_heads"] * config["attention_head_dim"], "ffn_dim": config["ffn_dim"],
            "heads": config["num_attention_heads"]}
    if args.smoke:
        dims = {"dim": 512, "ffn_dim": 1536, "heads": 4}
    if args.rank < 1:
        raise common.SettingError("--rank must be positive")
    dtype = DTYPES[args.dtype]
    model = _block_model(dims, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    raw = {"read_s": [], "fuse_s": [], "switch_s": [], "unfuse_s": []}
    with tempfile.TemporaryDirectory() as folder:
        files = [_write_lora(Path(folder) / f"lora{i}.safetensors", model, args.rank, seed=i) for i in range(2)]
        choices = []
        for path in files:
            began = time.perf_counter()
            read_lora(spec, path)
            raw["read_s"].append(time.perf_counter() - began)
            real, size, mtime = file_identity(path)
            choices.append(LoraChoice(name=path.name, path=real, scale=1.0, experts=("high_noise",), size=size,
                                      mtime_ns=mtime))
        adapters = ExpertAdapters("high_noise", model, spec)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(rounds):
            for key, wanted in (("fuse_s", ((choices[0], 1.0),)), ("switch_s", ((choices[1], 0.8),)),
                                ("unfuse_s", ())):
                report = adapters.ensure(wanted)
                raw[key].append(report.restore_s + report.fuse_s)
        exact = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    per_block = {key: common.median(values) for key, values in raw.items() if key != "read_s"}
    per_expert = {key: value * BLOCKS_PER_EXPERT for key, value in per_block.items()}
    plans = _plans()
    summary = {"block_parameters": params, "per_block_s": per_block,
               "per_expert_s": per_expert if not args.smoke else None, "unfuse_exact": exact,
               "read_convert_s": raw["read_s"], "plans": plans}
    rows = [[name.replace("_s", ""), f"{per_block[name] * 1e3:.1f}",
             f"{per_expert[name]:.2f}" if not args.smoke else "-"] for name in per_block]
    table = common.format_table(
        ["operation", "ms per block", f"s per expert (x{BLOCKS_PER_EXPERT})"], rows,
        title=f"LoRA rank {args.rank} on {'a small' if args.smoke else 'a full-size A14B'} block "
              f"({params / 1e6:.0f}M parameters, {args.dtype}), {rounds} round(s), {common.device_name(device)}",
        notes=[f"unfuse returns the base weights bit for bit: {exact}",
               f"reading + converting one LoRA file: {common.median(raw['read_s']) * 1e3:.0f} ms (cached after)"])
    plan_rows = []
    for case, row in plans.items():
        d, light = row["default"], row["lightning"]
        plan_rows.append([case, f"{d['s_per_video']:.1f}", d["forwards"], f"{light['s_per_video']:.1f}",
                          light["forwards"], f"{d['s_per_video'] / light['s_per_video']:.1f}x"])
    table += "\n\n" + common.format_table(
        ["model, GPUs (1280x720, 81 frames)", "40-step s/video", "forwards", "lightning s/video", "forwards",
         "speed-up"], plan_rows, title="planner: best layout, default recipe vs --preset lightning",
        notes=["the speed-up stays below the forward ratio: text encoding and the VAE decode do not shrink"])
    settings = {"rank": args.rank, "dtype": args.dtype, "rounds": rounds, "smoke": bool(args.smoke),
                "dims": dims, "blocks_per_expert": BLOCKS_PER_EXPERT}
    return common.BenchResult(settings=settings, raw=raw, summary=summary, table=table, device=str(device))
