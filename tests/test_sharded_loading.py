"""Sharded loading (parallel/sharded_loading.py): every rank fills its FSDP2 shards straight from the file, and holds
no more than 1/P of the model + one block at any moment of loading and sampling; the result equals the unsharded
model bitwise."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def small_config(hidden: int = 96, depth: int = 3, grid: int = 4, heads: int = 4):
    from opendit.models.dit import DiTConfig, preset

    values = {**preset("DiT-S/2").to_dict(), "hidden_size": hidden, "num_heads": heads, "depth": depth}
    return DiTConfig(**{**values, "input_size": (2 * grid, 2 * grid)})


def write_checkpoint(config, directory, fmt: str, seed: int = 0):
    """Random weights (every tensor, pos_embed the model's own) saved as our safetensors or an official-style .pt."""
    from opendit.io.checkpoint import save_safetensors
    from opendit.models.dit import build_dit

    torch.manual_seed(seed)
    model = build_dit(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)
    if fmt == "safetensors":
        return str(save_safetensors(model, directory / "model.safetensors"))
    path = directory / "model.pt"
    torch.save(model.state_dict(), path)  # the official DiT files are raw state dicts
    return str(path)


def sharded_runtime():
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime

    world = torch.distributed.get_world_size()
    return build_runtime(ParallelConfig(ulysses=world, shard_weights=True), torch.device("cpu"))


def _load_sharded(config, ckpt, dtype, load_config=None, runtime=None):
    """What an engine rank does for --ulysses P --shard-weights: meta model -> parallelize -> fill the shards."""
    from opendit.io.checkpoint import open_for_model
    from opendit.parallel.apply import parallelize
    from opendit.parallel.sharded_loading import fill_sharded

    runtime = runtime or sharded_runtime()
    model, state, release, path = open_for_model(load_config or config, ckpt, dtype)
    model.set_input_size(config)
    pmodel = parallelize(model, runtime)
    stats = fill_sharded(model, state, torch.device("cpu"), release, path)
    return model.eval(), pmodel, stats


def _equal_worker(rank, world, config, load_config, ckpt, dtype):
    from opendit.io.checkpoint import load_model

    model, pmodel, stats = _load_sharded(config, ckpt, dtype, load_config)
    reference = load_model(load_config or config, ckpt, dtype=dtype)
    reference.set_input_size(config)
    state = reference.state_dict()
    mismatched = [name for name, p in model.named_parameters() if not torch.equal(p.full_tensor(), state[name])]
    torch.manual_seed(1)
    x = torch.randn(2, config.in_channels, *config.input_size).to(dtype)
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
    with torch.no_grad():
        out, ref = pmodel(x, t, y), reference(x, t, y)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()  # max relative error
    return mismatched, err, stats.to_dict()


@pytest.mark.parametrize(
    "world,fmt,dtype,resize",
    [
        (2, "safetensors", torch.float32, False),
        (3, "pt", torch.float32, False),
        (4, "pt", torch.bfloat16, False),
        (2, "safetensors", torch.bfloat16, True),
    ],
)
def test_sharded_load_equals_unsharded(tmp_path, world, fmt, dtype, resize):
    # 97 rows of the patch embedder's weight... are not a multiple of 3 or 4: uneven chunks, some ranks' last empty
    native = small_config(hidden=96 if world != 3 else 120, heads=4 if world != 3 else 6)
    ckpt = write_checkpoint(native, tmp_path, fmt)
    config = native.with_image_size(native.image_size[0] + 16) if resize else native  # another size: derived
    load_config = native if resize else None
    for rank, (mismatched, error, stats) in enumerate(
        run_distributed(_equal_worker, world, config, load_config, ckpt, dtype, timeout=240)
    ):
        assert not mismatched, f"rank {rank}: shards differ from the unsharded load: {mismatched}"
        # the weights are bit-equal (above); the forward is the project's exactness rule, 1e-5 relative: on AVX-512 /
        # AMX CPUs uneven Ulysses shards take other SDPA / GEMM blockings than one process (measured 4e-7 at world 3
        # with gloo and shm alike, and already at this session's start), on AVX2 they happened to be bit-equal
        assert error <= 1e-5, f"rank {rank}: sharded forward differs by {error} (relative)"
        assert stats["mode"] == "sharded" and stats["tensors"] > 0
        assert ("pos_embed" in stats["derived"]) == resize
        print(f"P={world} {fmt} {dtype} resize={resize}: rank {rank} read {stats['read_bytes']} bytes, "
              f"largest {stats['largest_read_bytes']}")  # fmt: skip


def _memory_worker(rank, world, config, ckpt):
    from tests.helpers import forward_peak, unit_bytes

    from opendit.models.dit import DiTConfig, build_dit
    from opendit.observe.memory import exact_malloc, peak_rss_bytes, reset_peak_rss, rss_bytes
    from opendit.parallel.sharding import sharded_parameter_bytes

    assert exact_malloc()
    # Everything loading and sampling import, imported before the baseline (FSDP2 pulls in torch._dynamo, ~70 MiB).
    import torch._dynamo  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    import opendit.engine  # noqa: F401

    reference = build_dit(config, device="meta")
    full = sum(p.numel() * 4 for p in reference.parameters())
    block = sum(p.numel() * 4 for p in reference.blocks[0].parameters())
    del reference
    runtime = sharded_runtime()  # its process groups' buffers (gloo) are not parameter memory: before the baseline
    x = torch.randn(2, config.in_channels, *config.input_size)
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
    with torch.no_grad():  # warm up kernels and thread pools (one-time workspaces, not parameters)
        build_dit(DiTConfig(**{**config.to_dict(), "depth": 1}))(x, t, y)
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    model, pmodel, stats = _load_sharded(config, ckpt, torch.float32, runtime=runtime)
    gc.collect()
    load_peak, resident = peak_rss_bytes() - base, rss_bytes() - base
    sample_peak = forward_peak(pmodel, x, t, y, base)
    root = unit_bytes(model.x_embedder) + model.pos_embed.numel() * 4
    return {
        "full": full,
        "block": block,
        "root": root,
        "largest_read": stats.largest_read_bytes,
        "local": sharded_parameter_bytes(model),
        "resident": resident,
        "load_peak": load_peak,
        "sample_peak": sample_peak,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("world,fmt", [(2, "pt"), (4, "safetensors")])
def test_per_rank_memory_while_loading_and_sampling_is_1_over_p_plus_one_block(tmp_path, world, fmt):
    # Weights dominate: DiT-B width (768), 4 blocks (40.5 MiB each), 16 tokens -> 165 MiB of fp32 parameters.
    config = small_config(hidden=768, depth=4, grid=4, heads=12)
    ckpt = write_checkpoint(config, tmp_path, fmt)
    gc.collect()
    for rank, r in enumerate(run_distributed(_memory_worker, world, config, ckpt, timeout=300, start_method="spawn")):
        share = r["full"] / world
        mib = {k: round(v / 2**20, 1) for k, v in r.items()}
        print(f"P={world} {fmt} rank {rank}: {mib} MiB; load peak = 1/P + {(r['load_peak'] - share) / r['block']:.2f}"
              f" blocks, sampling peak = 1/P + {(r['sample_peak'] - share) / r['block']:.2f} blocks")  # fmt: skip
        assert r["local"] <= share * 1.02 + (1 << 20), mib  # this rank's shards: 1/P (+ FSDP2's row padding)
        assert r["largest_read"] <= r["block"], mib  # one tensor (slice) in flight, never the whole model
        assert r["resident"] <= share * 1.05 + (4 << 20), mib
        # the bound of the issue: at every moment (the high-water mark), 1/P of the model + one block
        assert r["load_peak"] <= share + r["block"], mib
        assert r["sample_peak"] <= share + r["block"] + r["root"] + (2 << 20), mib
