"""--shard-weights (parallel/sharding.py, FSDP2): exact against unsharded, and 1/P + one block of parameter memory."""

import gc

import pytest
import torch

from dist_utils import run_distributed
from helpers import forward_peak, unit_bytes
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, build_dit, preset

pytestmark = pytest.mark.slow  # every case here spawns gloo processes


def small_config() -> DiTConfig:
    base = preset("DiT-D/2").to_dict()  # depth 6, hidden 128, 4 heads
    over = {"input_size": (16, 16), "in_channels": 1, "num_classes": 10, "learn_sigma": False, "latent": False}
    return DiTConfig(**{**base, **over})


def seeded_model(config: DiTConfig, dtype=torch.float32):
    """Identical random weights on every rank, with non-zero adaLN so that every block matters."""
    torch.manual_seed(0)
    model = build_dit(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                param.normal_(0, 0.02)
    return model.to(dtype)


def inputs(config: DiTConfig):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, *config.input_size, generator=g)
    return x, torch.tensor([17.0, 640.0]), torch.tensor([3, config.num_classes])


def _run_plan(config, x, t, y, mode, world, prefetch=True):
    """Fresh seeded model; mode "alone": sharding only (full sequence on every rank), else sharding inside the
    runtime's sequence-parallel plan ("ulysses" or "ring"). Returns (two forward outputs, model)."""
    import torch.distributed as dist

    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.apply import parallelize
    from opendit.parallel.sharding import apply_weight_sharding

    model = seeded_model(config)
    if mode == "alone":
        apply_weight_sharding(model, dist.group.WORLD, prefetch=prefetch)
        apply_weight_sharding(model, dist.group.WORLD)  # idempotent: a second call changes nothing
        fn = model
    else:
        fn = parallelize(model, build_runtime(ParallelConfig(**{mode: world}, shard_weights=True)))
    with torch.no_grad():
        return [fn(x, t, y) for _ in range(2)], model  # the second forward re-gathers what the first freed


def _exact_worker(rank, world):
    import torch.distributed as dist

    from opendit.parallel.sharding import apply_weight_sharding, parameter_bytes, sharded_parameter_bytes

    config = small_config()
    x, t, y = inputs(config)
    with torch.no_grad():
        ref = seeded_model(config)(x, t, y)  # one process, unsharded: the reference
    modes = [("alone", True), ("alone", False), ("ulysses", True)] + ([("ring", True)] if world == 2 else [])
    out = {}
    for mode, prefetch in modes:
        outs, model = _run_plan(config, x, t, y, mode, world, prefetch)
        out[(mode, prefetch)] = {
            "err": [float((o - ref).abs().max() / ref.abs().max()) for o in outs],
            "resident": sharded_parameter_bytes(model),
            "full": parameter_bytes(seeded_model(config)),
            "types": {type(p).__name__ for p in model.parameters()},
            "pos_embed_local": tuple(model.pos_embed.to_local().shape) if world > 1 else None,
            "class": type(model).__name__,
        }
    from opendit.distributed.comm import CommStats
    from opendit.parallel.sharding import WeightAllGather

    stats = CommStats()
    gather = WeightAllGather(True, stats)  # direct use: an input that is not a view of the output is copied in first
    gathered = []
    for async_op in (False, True):
        flat = gather.allocate((world * 5,), dtype=torch.float32, device=torch.device("cpu"))
        work = gather(flat, torch.arange(5.0) + 10 * rank, dist.group.WORLD, async_op=async_op)
        if work is not None:
            work.wait()
        gathered.append(flat.tolist())
    out["gathered"] = gathered
    out["gather_stats"] = stats.snapshot()
    errors = []
    try:
        apply_weight_sharding(build_dit(config, device="meta"), dist.group.WORLD)
    except OpenDiTError as exc:
        errors.append(str(exc))
    from torch.distributed.device_mesh import init_device_mesh

    try:
        apply_weight_sharding(seeded_model(config), init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b")))
    except OpenDiTError as exc:
        errors.append(str(exc))
    return out, errors


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_output_equals_unsharded(world):
    """Alone (with and without prefetch), under Ulysses and (P=2) ring: fp32 output within 1e-5 of one process."""
    for out, errors in run_distributed(_exact_worker, world, timeout=300):
        expected = [float(i + 10 * r) for r in range(world) for i in range(5)]
        assert out.pop("gathered") == [expected, expected]
        counted = out.pop("gather_stats")["weight_gather"]  # what this rank sends: (P-1) x 5 floats, twice
        assert counted["calls"] == 2 and counted["bytes"] == 2 * (world - 1) * 5 * 4 and counted["wait_s"] >= 0
        for (mode, _prefetch), r in out.items():
            assert max(r["err"]) <= 1e-5, (mode, r["err"])  # Ulysses/ring only reorder attention sums (~1e-7)
            if mode == "alone":
                assert max(r["err"]) == 0.0  # the all-gather is a copy: bitwise equal
            assert r["types"] == {"DTensor"} and r["class"] == "FSDPDiT"  # resharded after forward, root included
            # pos_embed (1, T, C) has fewer rows than ranks: sharded on its largest evenly divisible dim, not padded
            # to P rows of which every rank would keep a whole (T, C) copy.
            assert r["pos_embed_local"] == (1, 64, 128 // world), r["pos_embed_local"]
            # Resident parameters: 1/P of the model plus dim-0 padding (each tensor padded to a multiple of P rows).
            assert r["resident"] <= r["full"] / world * 1.02 + 4096 * world, (r["resident"], r["full"] / world)
        assert "over a DeviceMesh" in errors[0]  # on meta: sharded loading, whose mesh names the device
        assert "1-D mesh" in errors[1] and "mesh['ulysses']" in errors[1]


def _memory_worker(rank, world):
    """Per-rank parameter memory from the resident set (see sharding.py's measurement notes), prefetch off then on."""
    import torch.distributed as dist

    from opendit.observe.memory import exact_malloc, rss_bytes
    from opendit.parallel.sharding import apply_weight_sharding, parameter_bytes

    assert exact_malloc()
    # Import what sharding imports before the baseline: FSDP2 pulls in torch._dynamo, ~70 MiB of resident module
    # memory that is not parameter memory (an engine worker has it already through diffusers).
    import torch._dynamo  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    # Parameters dominate: DiT-B width (768), depth 3, 64 tokens -> 10.6M parameters (40.5 MiB) per block.
    config = DiTConfig(**{**small_config().to_dict(), "hidden_size": 768, "num_heads": 12, "depth": 3})
    x, t, y = inputs(config)
    with torch.no_grad():
        build_dit(DiTConfig(**{**config.to_dict(), "depth": 1}))(x, t, y)  # warm up kernels, thread pools
    results = {}
    for prefetch in (False, True):
        gc.collect()
        base = rss_bytes()
        model = seeded_model(config)
        full, block = parameter_bytes(model), unit_bytes(model.blocks[0])
        root = unit_bytes(model.x_embedder) + model.pos_embed.numel() * 4
        apply_weight_sharding(model, dist.group.WORLD, prefetch=prefetch)
        gc.collect()
        resident = rss_bytes() - base
        peak = forward_peak(model, x, t, y, base)  # after a first forward: FSDP2's lazy init
        results[prefetch] = {"full": full, "block": block, "root": root, "resident": resident, "peak": peak}
        del model
    return results


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("world", [2, 4])
def test_per_rank_parameter_memory_is_1_over_p_plus_one_block(world):
    for per_rank in run_distributed(_memory_worker, world, timeout=300, start_method="spawn"):  # a clean resident set
        for prefetch, r in per_rank.items():
            share = r["full"] / world
            mb = {k: round(v / 2**20, 1) for k, v in r.items()}
            extra = (r["peak"] - share) / r["block"]
            print(f"P={world} prefetch={prefetch}: {mb} MiB; peak = 1/P + {extra:.2f} blocks")
            assert r["resident"] <= share * 1.05 + (4 << 20), mb  # persistent: 1/P (+ padding, allocator noise)
            # During forward (see sharding.py): measured 1/P + 0.98-0.99 blocks without prefetch and 0.90 with it,
            # since the gloo all-gather broadcasts in place (gloo's all_gather_into_tensor staged a second copy of
            # every unit: 1.0 / 1.2-1.3 blocks). The bound: 1/P + one block.
            assert r["peak"] <= share + r["block"] + r["root"] + (2 << 20), mb
