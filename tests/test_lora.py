"""LoRAs per expert: parity with diffusers' own ``load_lora_weights`` in every layout users have,
on every parallel layout; exact unfusing; switching sets between requests; bad files refused
before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relay.engine.lora import LoraRef

PROMPT = "a lighthouse on a cliff at dusk"
SETTINGS = dict(prompt=PROMPT, seed=11, steps=6, height=32, width=32, frames=5, guidance=4.0,
                guidance_low=3.0, shift=5.0)
HIGH_SCALE, LOW_SCALE = 0.7, 1.3


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    """Per layout: a high-noise LoRA (rank 4, with alpha; bias deltas where diffusers reads them)
    and a different low-noise one (rank 8), plus a second high-noise LoRA to stack."""
    from relay.engine.models.wan.tiny import write_lora

    root = tmp_path_factory.mktemp("loras")
    model = tiny_models["t2v"]
    files = {}
    for layout in ("diffusers", "wan", "kohya"):
        # diffusers' musubi converter reads neither bias deltas nor files without alpha.
        bias = layout != "kohya"
        files[layout] = {
            "high": write_lora(root / f"high-{layout}.safetensors", model, expert="high_noise", layout=layout,
                               rank=4, alpha=2.0 if layout != "diffusers" else 8.0, seed=1, bias=bias),
            "low": write_lora(root / f"low-{layout}.safetensors", model, expert="low_noise", layout=layout,
                              rank=8, alpha=8.0 if layout == "kohya" else None, seed=2),
        }
    files["stack"] = write_lora(root / "stack.safetensors", model, expert="high_noise", rank=2, seed=3)
    files["norms"] = write_lora(root / "norms.safetensors", model, expert="low_noise", layout="wan",
                                rank=4, seed=4, norm_deltas=True)
    files["root"] = root
    return files


def _diffusers(model_dir, *, high=(), low=(), **settings):
    """diffusers' WanPipeline with each expert's adapters loaded by ``load_lora_weights``
    (``load_into_transformer_2`` for the low-noise expert); ``high``/``low``: ``[(file, scale)]``."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=settings["shift"])
    pipe.set_progress_bar_config(disable=True)
    for transformer, entries, into_2 in ((pipe.transformer, high, False), (pipe.transformer_2, low, True)):
        names = []
        for index, (path, _) in enumerate(entries):
            name = f"{'low' if into_2 else 'high'}{index}"
            pipe.load_lora_weights(str(path), adapter_name=name, load_into_transformer_2=into_2)
            names.append(name)
        if names:
            transformer.set_adapters(names, weights=[scale for _, scale in entries])
    return pipe(prompt=settings["prompt"], negative_prompt="", height=settings["height"], width=settings["width"],
                num_frames=settings["frames"], num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance"], guidance_scale_2=settings["guidance_low"],
                generator=torch.Generator().manual_seed(settings["seed"]), output_type="np").frames[0]


@pytest.fixture(scope="module")
def engine(tiny_models):
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    return Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))


def _generate(engine, loras=(), **overrides):
    from relay.engine.request import GenerationRequest

    return engine.generate(engine.resolve(GenerationRequest(loras=tuple(loras), **{**SETTINGS, **overrides})))


def _refs(high=(), low=(), both=()):
    return ([LoraRef(path=str(p), scale=s) for p, s in both]
            + [LoraRef(path=str(p), scale=s, expert="high_noise") for p, s in high]
            + [LoraRef(path=str(p), scale=s, expert="low_noise") for p, s in low])


@pytest.fixture(scope="module")
def base_frames(engine):
    return _generate(engine)


@pytest.mark.parametrize("layout", ["diffusers", "wan", "kohya"])
def test_different_loras_per_expert_equal_diffusers(layout, loras, engine, tiny_models, base_frames):
    high, low = [(loras[layout]["high"], HIGH_SCALE)], [(loras[layout]["low"], LOW_SCALE)]
    ours = _generate(engine, _refs(high=high, low=low))
    theirs = _diffusers(tiny_models["t2v"], high=high, low=low, **SETTINGS)
    assert np.abs(ours - base_frames).max() > 0.05  # the LoRAs really change the video
    assert np.abs(ours - theirs).max() <= 1e-5


def test_stacked_loras_and_one_for_both_experts_equal_diffusers(loras, engine, tiny_models):
    both = [(loras["wan"]["high"], 0.5)]
    high = [(loras["stack"], 1.5)]
    ours = _generate(engine, _refs(both=both, high=high))
    theirs = _diffusers(tiny_models["t2v"], high=both + high, low=both, **SETTINGS)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_norm_deltas_diffusers_drops_are_applied(loras, tiny_models):
    """A distill LoRA's norm ``diff`` keys (diffusers drops them) change the norm scales: equal
    to the base model with those scales edited by hand."""
    from safetensors.torch import load_file

    from relay.engine.loader import load_model
    from relay.engine.models.wan.lora import diffusers_name
    from relay.engine.pipeline import Engine
    from relay.engine.request import GenerationRequest

    with_lora = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    ours = _generate(with_lora, _refs(low=[(loras["norms"], 0.6)]))
    by_hand = load_model(tiny_models["t2v"], dtype="fp32", device="cpu")
    raw = load_file(loras["norms"])
    edited = 0
    expert = by_hand.experts["low_noise"]
    with torch.no_grad():
        for key, value in raw.items():
            if key.endswith(".diff"):
                module = expert.get_submodule(diffusers_name(key[len("diffusion_model."):-len(".diff")]))
                module.weight += 0.6 * value
                edited += 1
            elif key.endswith(".lora_down.weight"):
                stem = key[len("diffusion_model."):-len(".lora_down.weight")]
                module = expert.get_submodule(diffusers_name(stem))
                module.weight += 0.6 * (raw[key.replace("lora_down", "lora_up")] @ value)
    assert edited == 6  # three norms in each of the two blocks
    reference = Engine(by_hand).generate(with_lora.resolve(GenerationRequest(**SETTINGS)))
    assert np.abs(ours - reference).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_unfusing_returns_the_base_weights_exactly(dtype, loras, tiny_models):
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine
    from relay.engine.request import GenerationRequest

    engine = Engine(load_model(tiny_models["t2v"], dtype=dtype, device="cpu"))
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in engine.model.experts.items()}
    resolved = engine.resolve(GenerationRequest(
        loras=tuple(_refs(both=[(loras["wan"]["high"], 1.0)], low=[(loras["norms"], 1.0)])), **SETTINGS))
    reports = engine.apply_loras(resolved.loras)
    assert all(r.changed and r.parameters > 0 for r in reports)
    changed = engine.model.experts["low_noise"].blocks[0].attn1.to_q.weight
    assert not torch.equal(changed, before["low_noise"]["blocks.0.attn1.to_q.weight"])
    engine.apply_loras(())
    for name, module in engine.model.experts.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


def test_switching_sets_between_requests_never_reloads(loras, engine, base_frames):
    """A, then B, then none, then A again: each equals its own run on a fresh engine; the same set
    twice fuses nothing the second time."""
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    set_a = _refs(high=[(loras["diffusers"]["high"], 1.0)])
    set_b = _refs(both=[(loras["kohya"]["low"], 0.8)])
    weights = engine.model.experts["high_noise"].blocks[0].attn1.to_q.weight
    storage = weights.data_ptr()
    first_a = _generate(engine, set_a)
    again = _generate(engine, set_a)
    assert not any(r.changed for r in engine.lora_reports)
    b = _generate(engine, set_b)
    none = _generate(engine)
    last_a = _generate(engine, set_a)
    assert weights.data_ptr() == storage  # fused in place: nothing reloaded or reallocated
    fresh = Engine(load_model(engine.info.path, dtype="fp32", device="cpu"))
    assert np.array_equal(first_a, again) and np.array_equal(first_a, last_a)
    assert np.array_equal(none, base_frames)
    assert np.array_equal(b, _generate(fresh, set_b))
    assert np.abs(first_a - b).max() > 0.05


def test_offloaded_model_fuses_its_host_copies(loras, tiny_models, engine):
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    refs = _refs(high=[(loras["wan"]["high"], HIGH_SCALE)], low=[(loras["wan"]["low"], LOW_SCALE)])
    offloaded = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu", offload=True))
    assert np.array_equal(_generate(offloaded, refs), _generate(engine, refs))
    assert np.array_equal(_generate(offloaded), _generate(engine))


# --- bad LoRAs ------------------------------------------------------------------------------------
def _rewrite(source, target, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(source)
    change(tensors)
    save_file(tensors, str(target))
    return target


def _bad_files(loras, root):
    """``{case: (file, expected words)}`` for files that must be refused."""
    src = loras["diffusers"]["high"]
    key = "transformer.blocks.0.attn1.to_q.lora_A.weight"
    bad = {
        "shape": (_rewrite(src, root / "bad-shape.safetensors",
                           lambda t: t.__setitem__(key, torch.zeros(4, 48))),
                  ["blocks.0.attn1.to_q", "another model"]),
        "no module": (_rewrite(src, root / "bad-block.safetensors",
                               lambda t: t.__setitem__("transformer.blocks.7.attn1.to_q.lora_A.weight",
                                                       torch.zeros(4, 64))),
                      ["blocks.7.attn1.to_q", "matches no module"]),
        "wan 2.1 i2v": (_rewrite(loras["wan"]["high"], root / "bad-i2v.safetensors", lambda t: t.update({
            "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, 4),
            "diffusion_model.blocks.0.cross_attn.v_img.lora_down.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.cross_attn.v_img.lora_up.weight": torch.zeros(64, 4)})),
            ["add_k_proj", "matches no module"]),
        "not a lora": (_rewrite(src, root / "bad-keys.safetensors",
                                lambda t: t.update({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(64, 64)})),
                       ["blocks.0.attn1.to_q.weight", "not a LoRA key"]),
    }
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all" * 10)
    bad["unreadable"] = (garbage, ["garbage.safetensors", "cannot be read"])
    return bad


def test_bad_loras_are_refused_with_the_file_and_key_and_nothing_runs(loras, tiny_models, relay, tmp_path):
    for case, (path, words) in _bad_files(loras, tmp_path).items():
        out = tmp_path / f"{case}.npy"
        result = relay("generate", "--model", tiny_models["t2v"], "--prompt", PROMPT, "--steps", "2",
                       "--lora-high", f"{path}:0.5", "--output", out, "--quiet")
        assert result.code == 2, (case, result.err)
        assert "--lora" in result.err and str(path.name) in result.err, (case, result.err)
        for word in words:
            assert word in result.err, (case, word, result.err)
        assert not out.exists()
    for flags, words in ((["--lora", str(tmp_path / "missing.safetensors")], ["missing.safetensors", "cannot be read"]),
                         (["--lora", f"{loras['stack']}:nan"], ["scale"]),
                         (["--lora-low", f"{loras['stack']}:99"], ["scale", "99"])):
        result = relay("generate", "--model", tiny_models["t2v"], "--prompt", PROMPT, *flags,
                       "--output", tmp_path / "x.npy", "--quiet")
        assert result.code == 2 and all(w in result.err for w in words), result.err


def test_one_expert_lora_on_a_dense_model_is_refused(loras, tiny_models, relay, tmp_path):
    result = relay("generate", "--model", tiny_models["ti2v"], "--prompt", PROMPT, "--lora-high",
                   loras["stack"], "--output", tmp_path / "x.npy", "--quiet")
    assert result.code == 2 and "single transformer" in result.err


def test_a_file_changed_after_its_check_is_refused_by_the_worker(loras, engine, tmp_path):
    import shutil

    from relay.engine.errors import ValidationError
    from relay.engine.request import GenerationRequest

    copy = shutil.copy(loras["stack"], tmp_path / "moving.safetensors")
    resolved = engine.resolve(GenerationRequest(loras=(LoraRef(path=str(copy)),), **SETTINGS))
    shutil.copy(loras["wan"]["high"], copy)  # another LoRA under the same name
    with pytest.raises(ValidationError, match="changed since"):
        engine.apply_loras(resolved.loras)


# --- parallel layouts -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_with_loras(loras, tiny_models):
    high = [(loras["wan"]["high"], HIGH_SCALE)]
    low = [(loras["diffusers"]["low"], LOW_SCALE)]
    return high, low, _diffusers(tiny_models["t2v"], high=high, low=low, **SETTINGS)


def _cli_settings():
    s = SETTINGS
    return ["--prompt", s["prompt"], "--seed", s["seed"], "--steps", s["steps"], "--height", s["height"],
            "--width", s["width"], "--frames", s["frames"], "--guidance", s["guidance"],
            "--guidance-low", s["guidance_low"], "--shift", s["shift"], "--dtype", "fp32", "--device", "cpu"]


@pytest.mark.parametrize("layout", [["--ring", "2"], ["--ulysses", "2"], ["--cfg-parallel", "2"], ["--fsdp", "2"]],
                         ids=["ring", "ulysses", "cfg", "fsdp"])
def test_two_process_layouts_equal_diffusers(layout, reference_with_loras, tiny_models, relay, tmp_path):
    high, low, reference = reference_with_loras
    out = tmp_path / "out.npy"
    result = relay("generate", "--model", tiny_models["t2v"], *_cli_settings(), "--nproc", "2", *layout,
                   "--lora-high", f"{high[0][0]}:{high[0][1]}", "--lora-low", f"{low[0][0]}:{low[0][1]}",
                   "--output", out, "--quiet")
    assert result.code == 0, result.err
    assert np.abs(np.load(out) - reference).max() <= 1e-4


def test_staged_ray_groups_fuse_only_their_expert(reference_with_loras, tiny_models, relay, tmp_path):
    high, low, reference = reference_with_loras
    out = tmp_path / "out.npy"
    result = relay("generate", "--model", tiny_models["t2v"], *_cli_settings(), "--executor", "ray",
                   "--placement", "staged", "--nproc", "2",
                   "--lora-high", f"{high[0][0]}:{high[0][1]}", "--lora-low", f"{low[0][0]}:{low[0][1]}",
                   "--output", out, "--quiet")
    assert result.code == 0, result.err
    assert np.abs(np.load(out) - reference).max() <= 1e-4
