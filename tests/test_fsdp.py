"""FSDP2 rank-local loading (parallel/fsdp.py) against the unsharded diffusers / transformers models.

Each world size runs once, as real gloo processes (this file is also the worker script), and
every rank writes what it measured to a JSON file; the tests below only read those numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 150  # for the whole group of ranks; they are killed past it


class _FakeMesh:
    """Just enough of a DeviceMesh for ``local_shard_bounds``: a 1-D mesh seen from ``rank``."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.ways = rank, size

    def get_coordinate(self):
        return [self.rank]

    def size(self, mesh_dim: int = 0) -> int:
        return self.ways


@pytest.mark.parametrize("rows,ways", [(1, 4), (5, 4), (6, 4), (64, 4), (3, 2), (0, 2)])
def test_local_shard_bounds_follow_torch_chunk(rows, ways):
    """Uneven splits: short and empty last pieces, exactly where torch.chunk (FSDP2) puts them."""
    import torch
    from torch.distributed.tensor import Shard

    from relay.parallel.fsdp import local_shard_bounds

    full = torch.arange(rows * 3).reshape(rows, 3)
    chunks = list(torch.chunk(full, ways, dim=0)) if rows else []
    for rank in range(ways):
        shape, offset = local_shard_bounds(full.shape, _FakeMesh(rank, ways), [Shard(0)])
        expected = chunks[rank] if rank < len(chunks) else full[:0]
        assert shape == tuple(expected.shape)
        assert torch.equal(full[offset[0]:offset[0] + shape[0]], expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _index_sharded_copy(src: Path, dst: Path, stem: str) -> Path:
    """Rewrites ``src/stem.safetensors`` as two files plus ``stem.safetensors.index.json``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    with safe_open(str(src / f"{stem}.safetensors"), "pt") as handle:
        keys = sorted(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    weight_map = {}
    for part, chunk in enumerate((keys[::2], keys[1::2])):
        name = f"{stem}-{part + 1:05d}-of-00002.safetensors"
        save_file({key: tensors[key] for key in chunk}, str(dst / name))
        weight_map.update(dict.fromkeys(chunk, name))
    (dst / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def _without_key(src: Path, dst: Path, stem: str, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / f"{stem}.safetensors"))
    del tensors[key]
    save_file(tensors, str(dst / f"{stem}.safetensors"))
    return dst


def _run_ranks(world_size: int, job: dict, workdir: Path) -> list[dict]:
    """Runs this file as ``world_size`` gloo ranks; kills them all past ``RUN_TIMEOUT_S``."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs, logs = [], []
    for rank in range(world_size):
        log = open(workdir / f"rank{rank}.log", "w")  # a file, not a pipe: a full pipe would hang
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, json.dumps(job)], cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, env=dict(env, RANK=str(rank))))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        # Poll all ranks: once one fails the others would only hang in a collective, so stop.
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes) or any(code for code in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n"
                          + (workdir / f"rank{rank}.log").read_text()[-3000:] for rank in failed)
        pytest.fail(f"{world_size}-rank FSDP run failed or timed out:\n{tails}")
    return [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request, tiny_models, tmp_path_factory) -> list[dict]:
    """Per-rank measurements of one ``N``-rank run (each world size runs once per session)."""
    world_size = request.param
    work = tmp_path_factory.mktemp(f"fsdp{world_size}")
    job = {
        "out": str(work),
        "t2v": str(tiny_models["t2v"]),
        "ti2v": str(tiny_models["ti2v"]),
        # ti2v's transformer and t2v's encoder load from a sharded (index.json) checkpoint.
        "ti2v_indexed": str(_index_sharded_copy(tiny_models["ti2v"] / "transformer",
                                                work / "ti2v_indexed", "diffusion_pytorch_model")),
        "encoder_indexed": str(_index_sharded_copy(tiny_models["t2v"] / "text_encoder",
                                                   work / "encoder_indexed", "model")),
        "extras": world_size == 2,  # dtype and error checks: once is enough
    }
    if job["extras"]:
        job["broken"] = str(_without_key(tiny_models["t2v"] / "transformer", work / "broken",
                                         "diffusion_pytorch_model", "blocks.1.ffn.net.2.weight"))
    return _run_ranks(world_size, job, work)


def test_transformer_matches_unsharded(ranks):
    for result in ranks:
        assert result["t2v_diff"] <= 1e-5, result["t2v_diff"]
        assert result["t2v_scale"] > 0.1  # the comparison is not between two near-zero outputs


def test_ti2v_per_token_timesteps_match_unsharded(ranks):
    for result in ranks:
        assert result["ti2v_shape"] == [1, 48, 3, 8, 8]
        assert result["ti2v_diff"] <= 1e-5, result["ti2v_diff"]


def test_shards_are_the_fsdp_layout_of_the_checkpoint(ranks):
    """Every local shard equals DTensor's own split of the full tensor, and gathers back whole."""
    for result in ranks:
        assert result["layout_mismatches"] == []
        assert result["gather_mismatches"] == []
        assert result["buffer_mismatches"] == []
        assert result["eval"] and not result["requires_grad"]


def test_text_encoder_matches_unsharded(ranks):
    for result in ranks:
        assert result["encoder_tied"]
        assert result["encoder_diff"] <= 1e-5, result["encoder_diff"]
        assert result["encoder_scale"] > 0.1


def test_each_rank_holds_a_1_over_n_share(ranks):
    world_size = len(ranks)
    for model in ("t2v", "encoder"):
        full = ranks[0][f"{model}_full_bytes"]
        locals_ = [result[f"{model}_local_bytes"] for result in ranks]
        assert sum(locals_) == full  # shards partition the model: nothing duplicated, nothing lost
        for result, local in zip(ranks, locals_):
            # torch.chunk gives a rank at most one extra row of each parameter.
            assert local <= full / world_size + result[f"{model}_row_slack"], (model, local, full)
            assert local >= 0.9 * full / world_size, (model, local, full)


def test_reduced_dtypes_match_from_pretrained(ranks):
    """bf16 / fp16 keep the library's fp32 modules, so outputs equal from_pretrained's exactly."""
    if not ranks[0]["extras"]:
        pytest.skip("checked in the 2-rank run")
    for result in ranks:
        assert result["bf16_dtype_mismatches"] == []
        assert result["bf16_diff"] == 0.0
        assert result["fp16_encoder_dtype_mismatches"] == []
        assert result["fp16_encoder_diff"] == 0.0


def test_offload_policy_pins_only_for_cuda():
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from relay.parallel.fsdp import offload_policy

    assert type(offload_policy("cuda:1", False)) is OffloadPolicy  # the no-offload default
    for device, pinned in (("cuda", True), ("cuda:1", True), ("cpu", False)):
        policy = offload_policy(device, True)
        assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is pinned, device


def test_cpu_offload_matches_unsharded_with_shards_on_the_host(ranks):
    """``offload=True``: the same outputs, the same 1/N shares, every shard in host memory."""
    if not ranks[0]["extras"]:
        pytest.skip("checked in the 2-rank run")
    for result in ranks:
        for model in ("t2v", "encoder"):
            assert result[f"offload_{model}_diff"] <= 1e-5, (model, result[f"offload_{model}_diff"])
            assert result[f"offload_{model}_policy"] == ["CPUOffloadPolicy"], model
            assert result[f"offload_{model}_shard_devices"] == ["cpu"], model
            assert result[f"offload_{model}_local_bytes"] == result[f"{model}_local_bytes"], model
        assert result["offload_t2v_buffer_mismatches"] == []
        assert result["offload_encoder_tied"]


def test_missing_checkpoint_key_is_named(ranks):
    if not ranks[0]["extras"]:
        pytest.skip("checked in the 2-rank run")
    for result in ranks:
        assert "blocks.1.ffn.net.2.weight" in result["missing_error"]


# ----------------------------------------------------------------------------------- worker


def _worker(job: dict) -> None:
    """One rank: loads sharded and unsharded models and records how they compare."""
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
    from transformers import UMT5EncoderModel

    from relay.engine.models.wan.loading import text_encoder_on_meta, transformer_on_meta
    from relay.parallel.fsdp import load_sharded, local_parameter_bytes

    def load_sharded_transformer(model_dir, subfolder, **kwargs):
        """A Wan expert through the family's meta build and the generic FSDP2 loader."""
        folder = Path(model_dir) / subfolder
        return load_sharded(transformer_on_meta(folder), folder, **kwargs)

    def load_sharded_text_encoder(path, *, dtype, **kwargs):
        return load_sharded(text_encoder_on_meta(Path(path), dtype=dtype), path, dtype=dtype, **kwargs)

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))
    out: dict = {"extras": job["extras"]}
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 512, 32, generator=gen)

    def diff(a, b) -> float:
        return (a.float() - b.float()).abs().max().item()

    def row_slack(model) -> int:
        return sum(p[0].numel() * p.element_size() for p in model.parameters() if p.dim())

    def dtype_mismatches(sharded, ref) -> list[str]:
        ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
        return [n for n, p in sharded.named_parameters() if p.dtype != ref_dtypes[n]]

    # t2v transformer, fp32, single-file checkpoint.
    model = load_sharded_transformer(job["t2v"], "transformer", mesh=mesh, device="cpu",
                                     dtype=torch.float32)
    ref = WanTransformer3DModel.from_pretrained(job["t2v"], subfolder="transformer").eval()
    latents = torch.randn(1, 16, 3, 8, 8, generator=gen)
    with torch.no_grad():
        got = model(latents, torch.tensor([500]), text, return_dict=False)[0]
        want = ref(latents, torch.tensor([500]), text, return_dict=False)[0]
    t2v_ref, t2v_latents, t2v_want = ref, latents, want  # the offload run below reuses them
    out.update(t2v_diff=diff(got, want), t2v_scale=want.abs().mean().item(),
               t2v_local_bytes=local_parameter_bytes(model),
               t2v_full_bytes=local_parameter_bytes(ref), t2v_row_slack=row_slack(ref),
               eval=not model.training, requires_grad=any(p.requires_grad for p in model.parameters()))
    full_state = ref.state_dict()
    out["layout_mismatches"], out["gather_mismatches"] = [], []
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name
        split = distribute_tensor(full_state[name], mesh, param.placements, src_data_rank=None)
        if not torch.equal(split.to_local(), param.to_local()):
            out["layout_mismatches"].append(name)
        if not torch.equal(param.full_tensor(), full_state[name]):
            out["gather_mismatches"].append(name)
    ref_buffers = dict(ref.named_buffers())
    out["buffer_mismatches"] = [n for n, b in model.named_buffers() if not torch.equal(b, ref_buffers[n])]

    # ti2v transformer (48 channels, per-token timesteps), sharded index checkpoint.
    model = load_sharded_transformer(Path(job["ti2v_indexed"]).parent, "ti2v_indexed", mesh=mesh,
                                     device="cpu", dtype=torch.float32)
    ref = WanTransformer3DModel.from_pretrained(job["ti2v"], subfolder="transformer").eval()
    latents = torch.randn(1, 48, 3, 8, 8, generator=gen)
    timestep = torch.linspace(0, 900, 3 * 4 * 4).round().long()[None]  # one per patch token
    with torch.no_grad():
        got = model(latents, timestep, text, return_dict=False)[0]
        want = ref(latents, timestep, text, return_dict=False)[0]
    out.update(ti2v_diff=diff(got, want), ti2v_shape=list(got.shape))

    # Text encoder, fp32, sharded index checkpoint (stores only shared.weight of the tied pair).
    encoder = load_sharded_text_encoder(job["encoder_indexed"], mesh=mesh, device="cpu",
                                        dtype=torch.float32)
    ref = UMT5EncoderModel.from_pretrained(Path(job["t2v"]) / "text_encoder").eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        got = encoder(ids, attention_mask=mask).last_hidden_state
        want = ref(ids, attention_mask=mask).last_hidden_state
    encoder_want = want
    out.update(encoder_diff=diff(got, want), encoder_scale=want.abs().mean().item(),
               encoder_tied=encoder.shared.weight is encoder.encoder.embed_tokens.weight,
               encoder_local_bytes=local_parameter_bytes(encoder),
               encoder_full_bytes=local_parameter_bytes(ref), encoder_row_slack=row_slack(ref))

    if job["extras"]:
        def offload_facts(sharded) -> dict:
            groups = [group for module in sharded.modules() if isinstance(module, FSDPModule)
                      for group in module._get_fsdp_state()._fsdp_param_groups]
            return {"policy": sorted({type(group.offload_policy).__name__ for group in groups}),
                    "shard_devices": sorted({p.to_local().device.type for p in sharded.parameters()}
                                            | {p.device.type for p in sharded.parameters()}),
                    "local_bytes": local_parameter_bytes(sharded)}

        model = load_sharded_transformer(job["t2v"], "transformer", mesh=mesh, device="cpu",
                                         dtype=torch.float32, offload=True)
        with torch.no_grad():
            got = model(t2v_latents, torch.tensor([500]), text, return_dict=False)[0]
        out.update({f"offload_t2v_{key}": value for key, value in offload_facts(model).items()})
        out["offload_t2v_diff"] = diff(got, t2v_want)
        ref_buffers = dict(t2v_ref.named_buffers())
        out["offload_t2v_buffer_mismatches"] = [
            n for n, b in model.named_buffers() if not torch.equal(b, ref_buffers[n])]
        encoder = load_sharded_text_encoder(Path(job["t2v"]) / "text_encoder", mesh=mesh,
                                            device="cpu", dtype=torch.float32, offload=True)
        with torch.no_grad():
            got = encoder(ids, attention_mask=mask).last_hidden_state
        out.update({f"offload_encoder_{key}": value
                    for key, value in offload_facts(encoder).items()})
        out.update(offload_encoder_diff=diff(got, encoder_want),
                   offload_encoder_tied=encoder.shared.weight is encoder.encoder.embed_tokens.weight)

        model = load_sharded_transformer(job["t2v"], "transformer", mesh=mesh, device="cpu",
                                         dtype=torch.bfloat16)
        ref = WanTransformer3DModel.from_pretrained(job["t2v"], subfolder="transformer",
                                                    torch_dtype=torch.bfloat16).eval()
        latents = torch.randn(1, 16, 3, 8, 8, generator=gen, dtype=torch.bfloat16)
        with torch.no_grad():
            got = model(latents, torch.tensor([500]), text.bfloat16(), return_dict=False)[0]
            want = ref(latents, torch.tensor([500]), text.bfloat16(), return_dict=False)[0]
        out.update(bf16_diff=diff(got, want), bf16_dtype_mismatches=dtype_mismatches(model, ref))
        encoder = load_sharded_text_encoder(Path(job["t2v"]) / "text_encoder", mesh=mesh,
                                            device="cpu", dtype=torch.float16)
        ref = UMT5EncoderModel.from_pretrained(Path(job["t2v"]) / "text_encoder",
                                               dtype=torch.float16).eval()
        with torch.no_grad():
            got = encoder(ids, attention_mask=mask).last_hidden_state
            want = ref(ids, attention_mask=mask).last_hidden_state
        out.update(fp16_encoder_diff=diff(got, want),
                   fp16_encoder_dtype_mismatches=dtype_mismatches(encoder, ref))
        try:
            load_sharded_transformer(Path(job["broken"]).parent, "broken", mesh=mesh, device="cpu",
                                     dtype=torch.float32)
            out["missing_error"] = "no error raised"
        except ValueError as exc:
            out["missing_error"] = str(exc)

    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()  # no rank tears down the group while another still needs it
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))


def _vmhwm(pid: int) -> int:
    """A process's peak resident set (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_sharded_rank_peaks_at_its_shard_not_at_whole_experts(tiny_models, tmp_path):
    """Measured: two 137 MB experts saved in 16 MB safetensors files, loaded by a 2-rank FSDP
    group on the CPU. Each rank's peak resident memory grows by its shard (~137 MB: half of
    each expert) over the same group loading the tiny model -- not by the 274 MB of whole
    experts a load-then-shard would cost."""
    import shutil

    from relay.engine.model_info import read_model_info
    from relay.engine.models.wan.tiny import TinySpec, _transformer
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    big = tmp_path / "big"
    shutil.copytree(tiny_models["t2v"], big)
    whole = 0
    for sub in ("transformer", "transformer_2"):
        shutil.rmtree(big / sub)
        expert = _transformer(TinySpec(attention_head_dim=128, ffn_dim=2048, num_layers=8), 16, 16)
        expert.save_pretrained(big / sub, max_shard_size="16MB")
        whole += sum(p.numel() * p.element_size() for p in expert.parameters())
        del expert
    layout = ParallelLayout(ulysses_degree=2, fsdp_degree=2)
    peaks, shares = {}, {}
    for name, folder in (("tiny", tiny_models["t2v"]), ("big", big)):
        info = read_model_info(folder)
        spec = WorkerSpec(model=str(folder), layout=layout, dtype="fp32", device_type="cpu", timeout_s=300.0)
        with Executor(plan_groups(info, None, layout=layout), spec, backend="mp", build_timeout_s=300) as executor:
            group = executor.groups[0]
            peaks[name] = [_vmhwm(pid) for pid in group.pids]
            shares[name] = [sum(s.values()) for s in group.call("parameter_bytes", timeout_s=60)]
    for rank in range(2):
        growth = peaks["big"][rank] - peaks["tiny"][rank]
        shard = shares["big"][rank]
        assert abs(shard - whole / 2) < 0.02 * whole
        assert growth < 1.15 * shard + 16 * 2**20, (rank, growth / 2**20, shard / 2**20)
        assert growth < 0.7 * whole, (rank, growth / 2**20, whole / 2**20)
