"""The strategy registry: a strategy defined in this test file (no edit in src/) is validated, installed, costed,
planned and listed by `opendit plan`, in the same process; the built-ins are all registered and declared."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.attention import local_attention
from opendit.parallel import registry
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy
from opendit.parallel.sequence import check_qkv, check_sizes, offsets, split_sizes

TOY = "allgather-kv"


class AllGatherKVAttention:
    """A toy exact kernel: all-gather K and V (packed, uneven sizes) over the ring group, attend locally.
    (B, S_r, H, D) x3 -> (B, S_r, H, D)."""

    def __init__(self, comm, sizes):
        self.comm, self.sizes = comm, check_sizes(sizes, comm.size)

    def __call__(self, q, k, v):
        check_qkv(TOY, q, k, v, self.sizes, self.comm.rank)
        kv = self.comm.all_gather(torch.stack((k, v)), 2, self.sizes)  # (2, B, S_r, H, D) -> (2, B, S, H, D)
        return local_attention(q, kv[0], kv[1])  # this rank's queries against every key


def toy_bytes(sizes, batch, heads, head_dim, rank, itemsize=4):
    """All-gather of this rank's (2, B, S_r, H, D) to the P - 1 others."""
    return 2 * batch * sizes[rank] * heads * head_dim * itemsize * (len(sizes) - 1)


class AllGatherKV(SequenceStrategy):
    name = TOY
    summary = "toy: all-gather K/V over the ring dimension, local attention (exact; O(S) memory per rank)"
    uses = ("ring",)

    def check(self, plan, dims):
        if plan.comm_dtype:
            raise OpenDiTError(f"{TOY} sends K/V exactly; drop --comm-dtype")
        return [f"{TOY} holds every rank's K/V"]

    def install(self, modules, runtime, sizes):
        core = AllGatherKVAttention(runtime.comms["ring"], sizes)
        for module in modules:
            module.core = core

    def block_work(self, dims, plan, batch, sizes, rank):
        return AttentionWork(q_tokens=sizes[rank], heads=dims.num_heads, qkv_rows=sizes[rank], dispatch_ops=0.1)

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s):
        nbytes = toy_bytes(sizes, batch, dims.num_heads, dims.head_dim, rank, itemsize)
        return [CommItem("all_gather", nbytes, 1, plan.ring)]

    def buffers(self, dims, plan, batch, sizes, itemsize):
        return 2 * batch * sum(sizes) * dims.hidden_size * itemsize


@pytest.fixture
def toy():
    strategy = registry.register(AllGatherKV())
    yield strategy
    registry.unregister(TOY)


def test_builtins_are_registered_with_their_layouts():
    found = registry.strategies()
    assert {"ulysses", "ulysses-overlap", "ring", "usp", "fastseq"} <= set(found)
    assert registry.auto_strategy(2, 1) == "ulysses-overlap" and registry.auto_strategy(1, 2) == "ring"
    assert registry.auto_strategy(2, 2) == "usp" and registry.auto_strategy(1, 1) == "none"
    assert {s.name for s in registry.strategies_for(4, 1)} == {"ulysses", "ulysses-overlap", "fastseq", "dsp"}
    with pytest.raises(OpenDiTError, match="unknown sp-impl 'nope'; choose one of ulysses"):
        ParallelConfig(ulysses=2, sp_impl="nope").validate(2, 4, 64, 1, True)


def test_toy_strategy_is_validated_costed_and_planned(toy):
    from opendit.models.dit import preset
    from opendit.planning.cost import block_comm, predict_memory, predict_step_time
    from opendit.planning.planner import plan
    from opendit.planning.speeds import named_hardware

    config = ParallelConfig(ring=3, sp_impl=TOY)
    assert config.validate(3, 4, 64, 1, True) == [f"{TOY} holds every rank's K/V"]
    with pytest.raises(OpenDiTError, match="drop --comm-dtype"):
        ParallelConfig(ring=2, sp_impl=TOY, comm_dtype="bf16").validate(2, 4, 64, 1, True)
    with pytest.raises(OpenDiTError, match=f"sp-impl {TOY} runs on ring only"):
        ParallelConfig(ulysses=2, sp_impl=TOY).validate(2, 4, 64, 1, True)
    xl = preset("DiT-XL/2")  # 256 tokens, 16 heads of 72
    sizes = split_sizes(256, 3)
    for rank in range(3):
        assert block_comm(xl, 256, 2, config, rank) == {
            "all_gather": {"bytes": toy_bytes(sizes, 2, 16, 72, rank), "calls": 1}
        }
    h100 = named_hardware("h100-nvlink")
    assert predict_step_time(xl, 256, 2, config, h100, guided=True).bytes_per_rank > 0
    # local batch 2 (cond + uncond) x the gathered (2, S, C) K/V in bf16
    assert predict_memory(xl, 256, 2, config, h100, guided=True).buffers == 2 * 2 * 256 * 1152 * 2
    result = plan(xl, 2, h100, images=1)
    estimates = result.ranked + result.dropped
    assert any(e.config.sp_impl == TOY for e in estimates)  # enumerated next to the built-ins


def test_toy_strategy_is_listed_by_opendit_plan(toy, capsys):
    from opendit.cli import main

    assert main(["plan", "--model", "DiT-S/2", "--nproc", "2", "--top", "40", "--hardware", "a100-pcie"]) == 0
    assert f"sequence parallel: {TOY}" in capsys.readouterr().out
    assert main(["plan", "--list-strategies"]) == 0
    listing = capsys.readouterr().out
    assert TOY in listing and "ulysses-overlap" in listing and "runs on: ring" in listing


def _toy_worker(rank, world):
    """Runs in each gloo process: register the toy (this process imported the test module, not the fixture), install
    it through parallelize() and compare with one process; return the recorded and predicted communication."""
    from opendit.diffusion.hooks import HookList, ModelCall, StepContext
    from opendit.distributed.mesh import build_runtime
    from opendit.models.dit import build_dit, perturb_weights, pixel_config
    from opendit.parallel.apply import parallelize
    from opendit.planning.cost import predict_step_comm

    registry.register(AllGatherKV())
    config = pixel_config("DiT-T/2", 16)  # 64 tokens: 22/21/21 at 3 ranks
    torch.manual_seed(0)
    reference = perturb_weights(build_dit(config).eval(), std=0.1, seed=1)
    gen = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 16, 16, generator=gen), torch.full((2,), 400.0), torch.tensor([3, 7])
    plan = ParallelConfig(ring=world, sp_impl=TOY)
    runtime = build_runtime(plan)
    pmodel = parallelize(copy.deepcopy(reference), runtime)
    with torch.no_grad():
        expected = reference(x, t, y)
        hooks = HookList(pmodel.step_hooks())
        ctx = StepContext(0, 1, 400.0, 0.0)
        out = pmodel(x, t, y)
        ctx.model_calls.append(ModelCall(0.0, 0.0))
        hooks.on_step_end(ctx)
    err = float((out - expected).abs().max() / expected.abs().max())
    recorded = {k: {"bytes": v["bytes"], "calls": v["calls"]} for k, v in runtime.stats.history[0].items()}
    predicted = predict_step_comm(config, config.num_tokens, 2, plan, runtime.coords["sp"])
    return {"err": err, "recorded": recorded, "predicted": predicted, "sizes": pmodel.token_sizes}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_toy_strategy_installs_exactly_and_is_counted_as_declared(world):
    results = run_distributed(_toy_worker, world)
    for rank, res in enumerate(results):
        assert res["err"] <= 1e-5, (rank, res["err"])
        assert res["recorded"] == res["predicted"], rank
        assert res["recorded"]["all_gather"]["calls"] == 2 + 1  # 2 blocks + the output gather
    assert results[0]["sizes"] == split_sizes(64, world) and offsets(results[0]["sizes"])[0] == 0
