"""Planner: enumeration, ranking by objective, memory filtering, and messages that name the nearest valid plans."""

from dataclasses import replace

import pytest

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.dit import preset
from opendit.planning.planner import check_request, enumerate_plans, nearest_plans, plan
from opendit.planning.speeds import named_hardware as hardware

GIB = 1 << 30
XL512 = preset("DiT-XL/2").with_image_size(512)  # 1024 tokens, 16 heads


def test_enumeration_is_complete_and_valid():
    plans = enumerate_plans(4, 16, 1024, images=2, guided=True)
    described = {(p.dp, p.cfg, p.ulysses, p.ring, p.impl, p.shard_weights) for p in plans}
    # dp in {1,2} x cfg in {1,2} x every factorisation of the rest x kernels x sharding
    assert (2, 2, 1, 1, "none", False) in described
    assert (1, 1, 2, 2, "usp", True) in described
    assert (1, 2, 2, 1, "fastseq", False) in described
    assert (1, 1, 4, 1, "ulysses", False) in described and (1, 1, 1, 4, "ring", False) in described
    assert (1, 1, 4, 1, "ulysses-overlap", True) in described
    # sp 4 (dp1 cfg1): ulysses 4 x 3 kernels, ring 4, usp 2x2, each x sharding = 10; sp 2 (cfg2 or dp2): 4 kernels x
    # sharding = 8 each; dp2 x cfg2: 1; dp 4 > 2 images
    assert len(plans) == 10 + 8 + 8 + 1
    for p in plans:
        p.validate(4, 16, 1024, 2, True)


def test_single_device_and_unguided():
    result = plan(XL512, 1, hardware("h100-nvlink"), images=1, guided=False)
    assert [e.config for e in result.ranked] == [ParallelConfig()]
    result = plan(XL512, 2, hardware("h100-nvlink"), images=1, guided=False)
    assert all(e.config.cfg == 1 for e in result.ranked)


def test_latency_prefers_cfg_and_ulysses_on_nvlink_and_explains():
    result = plan(XL512, 8, hardware("h100-nvlink"), images=1, guided=True, steps=50)
    best = result.best.config
    assert best.cfg == 2 and best.ulysses == 4 and best.impl == "ulysses" and not best.shard_weights
    text = result.explain()
    assert "best (latency)" in text and text.count("  vs ") == 3
    assert result.best.request_s == pytest.approx(50 * result.best.step.total_s)


def test_throughput_prefers_data_parallel_for_batches():
    result = plan(XL512, 8, hardware("h100-nvlink"), images=8, guided=True, objective="throughput")
    assert result.best.config.dp == 8
    # for one image the queue still fills 8 groups: throughput stays data parallel, latency does not
    assert plan(XL512, 8, hardware("h100-nvlink"), images=1, objective="throughput").best.config.dp == 8
    assert plan(XL512, 8, hardware("h100-nvlink"), images=1).best.config.dp == 1


def test_two_nodes_keep_ulysses_inside_a_node():
    result = plan(XL512, 16, hardware("h100-ib", nodes=2), images=1, tokens=32768)
    best = result.best.config
    assert best.ulysses * best.ring <= 8 or best.ulysses <= 8  # the all-to-all group never crosses the network
    assert best.cfg == 2


def test_memory_filter_drops_plans_and_picks_sharding():
    big = preset("DiT-XL/2").with_image_size(1024)  # 4096 tokens
    h100 = hardware("h100-nvlink")
    free = plan(big, 4, h100, images=4, guided=True)
    tight_bytes = min(e.memory.total for e in free.ranked if not e.config.shard_weights) * 0.97
    tight = plan(big, 4, h100, images=4, guided=True, memory_bytes=tight_bytes)
    assert tight.dropped and all(e.memory.total <= tight_bytes for e in tight.ranked)
    assert tight.best.config.shard_weights


def test_no_plan_fits_names_the_leanest():
    with pytest.raises(OpenDiTError, match=r"no plan fits 0\.5 GiB .* leanest need .*GiB.*Fix: more devices"):
        plan(XL512, 2, hardware("h100-nvlink"), images=2, memory_bytes=0.5 * GIB)


def test_bad_degrees_name_the_nearest_valid_plans():
    with pytest.raises(OpenDiTError, match=r"must equal the number of processes 4.*Nearest valid plans.*ulysses=4"):
        check_request(ParallelConfig(ulysses=8), XL512, world_size=4, images=1, guided=True)
    near = nearest_plans(ParallelConfig(dp=3), 4, 16, 1024, images=4, guided=False)
    assert near[0].dp in (2, 4)
    with pytest.raises(OpenDiTError, match=r"needs .* GiB per device.*nearest plans that fit: .*sharded weights"):
        check_request(
            ParallelConfig(ulysses=4),
            preset("DiT-XL/2").with_image_size(1024),
            4,
            images=1,
            guided=False,
            speeds=replace(hardware("h100-nvlink"), memory_bytes=1.0 * GIB, reserved_bytes=0.0),
        )
    assert check_request(ParallelConfig(cfg=2, ulysses=2), XL512, 4, images=1, guided=True) == []


def test_bad_objective():
    with pytest.raises(OpenDiTError, match="latency or throughput"):
        plan(XL512, 2, hardware("h100-nvlink"), objective="fast")


def test_tensor_parallel_plans_are_enumerated_and_valid():
    plans = enumerate_plans(4, 16, 1024, images=1, guided=True, tensor=True)
    tp = [p for p in plans if p.tp > 1]
    assert {(p.cfg, p.ulysses, p.ring, p.tp) for p in tp} >= {(1, 1, 1, 4), (2, 1, 1, 2), (1, 2, 1, 2), (1, 1, 2, 2)}
    assert not any(p.shard_weights for p in tp)  # --tp already splits the block weights
    for p in plans:
        p.validate(4, 16, 1024, 1, True)
    assert not any(p.tp > 1 for p in enumerate_plans(4, 16, 1024, images=1, guided=True))  # without a tp split


def test_tensor_parallel_divides_block_weights_in_the_memory_model():
    from opendit.models.dit import count_params
    from opendit.planning.cost import predict_memory

    speeds = hardware("a100-pcie")
    params = count_params(XL512)
    one, four = (predict_memory(XL512, 1024, 2, ParallelConfig(tp=n), speeds).weights for n in (1, 4))
    assert one - four == pytest.approx(XL512.depth * params["block"] * speeds.dtype_bytes * 3 / 4)


def test_memory_bound_on_pcie_picks_tensor_parallel_and_says_why():
    """Weights that must be split, on PCIe: FSDP-style shards would gather every block's weights each step over the
    slow link, tensor parallelism only moves activations; with room for the weights, sequence parallelism wins."""
    xl256 = preset("DiT-XL/2").with_image_size(256)
    pcie = hardware("a100-pcie")
    free = plan(xl256, 4, pcie, images=1, guided=True)
    assert free.best.config.tp == 1
    # exact plans only: PipeFusion (stale K/V) wins here too, see tests/test_pipefusion_cost.py
    tight = plan(xl256, 4, pcie, images=1, guided=True, memory_bytes=2.0 * GIB, stale=False)
    assert tight.best.config.tp == 4, tight.table()
    sharded = [e for e in tight.ranked if e.config.shard_weights]
    assert sharded and tight.best.step.total_s < 0.5 * min(e.step.total_s for e in sharded)
    assert "tp=4" in tight.explain()
