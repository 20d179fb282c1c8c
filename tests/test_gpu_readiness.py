"""CUDA + NCCL readiness on a CPU machine (issue 36): the NCCL-only paths' device logic, run with CUDA simulated.

No GPU is used. `torch.cuda.is_available` / `device_count` / `set_device` / `current_device` are monkeypatched, an
NCCL group is a stand-in Comm whose device is `meta` (CUDA cannot be allocated here; meta shows the same thing: the
tensor was made on the group's device, not on the CPU), and `dist` calls are recorded instead of made. Each test names
the issue's item it guards; on the code before the fix the items 1, 3, 5 and 6 tests fail.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from opendit.distributed.comm import Comm
from opendit.errors import OpenDiTError


class FakeNcclComm(Comm):
    """A Comm over a simulated NCCL group of `size` ranks: tensors belong on `device`; every collective records the
    device of the tensor it was given (a real NCCL group raises on a CPU tensor) and answers with ones."""

    def __init__(self, size: int = 2, device: str = "meta"):  # no process group: nothing is sent
        self.backend, self.size, self.rank, self.comm_dtype = "nccl", size, 0, None
        self._device = torch.device(device)
        self.seen: list[torch.device] = []

    @property
    def device(self) -> torch.device:
        return self._device

    def all_gather(self, x, dim, sizes, async_op=False, kind="all_gather"):
        self.seen.append(x.device)
        shape = list(x.shape)
        shape[dim] = sum(sizes)
        return torch.ones(shape, dtype=x.dtype)  # (.., P, ..) on the host: the answer's values do not matter here


class FakeRuntime:
    def __init__(self, comm):
        self.comm = comm

    def exact(self, name):
        return self.comm


@pytest.fixture
def four_gpus(monkeypatch):
    """This process sees 4 GPUs (simulated); set_device calls are recorded in the returned list."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls[-1].index if calls else 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Simulated GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return calls


# ------------------------------------------------------------------------------------------------ item 1
def test_balance_tokens_exchanges_busy_times_on_the_groups_device():
    """Item 1: --balance-tokens all-gathers every rank's busy time over the sequence group; on NCCL that tensor must
    be on the GPU (it was a CPU tensor: NCCL rejects it at the first re-split)."""
    from opendit.parallel.apply import make_balancer

    comm = FakeNcclComm()
    balancer = make_balancer(64, [32, 32], FakeRuntime(comm))
    busy = balancer.exchange(0.25)
    assert comm.seen == [torch.device("meta")], f"busy time all-gathered on {comm.seen}, the group is on meta"
    assert busy == [1.0, 1.0]


def test_family_token_counts_are_exchanged_on_the_groups_device():
    """Item 1, the same defect in the families' split: per-rank token counts all-gathered as CPU tensors."""
    from opendit.families.splits import SequenceState

    comm = FakeNcclComm()
    state = SequenceState(comm)
    state.sizes("blocks.0.attn", (1, 1))
    assert comm.seen == [torch.device("meta")]


def test_collective_device_follows_the_backend(monkeypatch):
    """The device a group's small exchanges are made on: the current GPU on NCCL, the CPU on gloo."""
    from opendit.distributed.comm import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device("nccl") == torch.device("cuda", 3)
    assert collective_device("gloo") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------ item 3
def test_calibrate_nccl_measures_on_the_gpu_and_its_file_is_found(monkeypatch, tmp_path, four_gpus):
    """Item 3: `opendit calibrate --backend nccl` times compute on the GPU, saves under the nccl key, and the loader
    (what --parallel auto / --dtype auto / opendit plan read) finds that file on a machine with GPUs. Before the fix
    compute ran on CPU tensors and the loader looked up the gloo key only."""
    from opendit.planning import calibrate as cal
    from opendit.planning import speeds as sp

    monkeypatch.setattr(sp, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(cal, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 << 30}))
    asked: dict = {}

    def fake_compute(threads=1, hidden=1152, heads=16, quick=False, device=None):
        asked["device"] = device
        d = sp.DEFAULTS["h100-nvlink"]
        rates = ("matmul_flops", "matmul_half_rows", "attn_flops", "attn_half_tokens", "mem_bw", "block_overhead_s")
        return {**{k: getattr(d, k) for k in rates}, "half_speedup": 12.0, "raw": {}}

    def fake_links(nproc=2, backend="gloo", threads=1, sizes=(), reps=10):
        asked["links_backend"] = backend
        return {k: {"link": sp.Link(1e-5, 1e11), "samples": [[1, 1e-5]]} for k in ("all_to_all", "all_gather", "p2p")}

    monkeypatch.setattr(cal, "measure_compute", fake_compute)
    monkeypatch.setattr(cal, "measure_links", fake_links)
    speeds, path = cal.calibrate(backend="nccl", nproc=2, quick=True)
    assert asked["device"] is not None and torch.device(asked["device"]).type == "cuda", "compute timed on CPU"
    assert asked["links_backend"] == "nccl"
    assert "-nccl-" in path.name and json.loads(path.read_text())["key"] in path.name
    loaded = sp.resolve_speeds()  # auto: the backend a job here runs on (NCCL: GPUs are visible)
    assert loaded.source == speeds.source and loaded.half_speedup == 12.0, f"loader missed {path}: {loaded.source}"


def test_loader_finds_an_nccl_calibration(monkeypatch, tmp_path, four_gpus):
    """Item 3: a saved NCCL calibration is what `resolve_speeds()` (opendit plan, --parallel auto, --dtype auto,
    --memory-gib) reads on a machine with GPUs, also one measured with another process count; before the fix it
    looked up the gloo key only and fell back to the H100 defaults."""
    from opendit.planning import speeds as sp

    monkeypatch.setattr(sp, "CACHE_DIR", tmp_path)
    mine = replace(sp.DEFAULTS["a100-pcie"], name="calibrated here", source="opendit calibrate (test)")
    path = sp.cache_path("nccl", 1, 4)  # measured with --nproc 4; the loader's default asks for 2
    path.write_text(json.dumps({"key": sp.machine_key("nccl", 1, 4), "speeds": mine.to_dict()}))
    assert sp.resolve_speeds().name == "calibrated here"
    assert sp.load_speeds(backend="nccl", nproc=4).name == "calibrated here"
    assert sp.load_speeds(backend="gloo").name != "calibrated here"  # a gloo run does not read the GPU's file


def test_calibrate_nccl_ranks_use_their_own_gpu(monkeypatch, four_gpus):
    """Item 3: each link rank of an NCCL calibration makes cuda:LOCAL_RANK current before the process group (which
    gets device_id), sends CUDA tensors, and synchronises its timings. Before the fix: every rank on cuda:0, CPU
    tensors over NCCL."""
    from opendit.distributed import comm as comm_module
    from opendit.planning import calibrate as cal

    monkeypatch.setenv("LOCAL_RANK", "1")
    inits, made, sent = [], [], []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: inits.append((a, k)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: None)
    real_randn = torch.randn

    def randn(*size, device=None, **kw):  # the requested device is recorded; the tensor is made on the host
        tensor = real_randn(*size, **kw)
        made.append((id(tensor), torch.device(device) if device is not None else torch.device("cpu")))
        return tensor

    class Stop(Exception):
        pass

    class RecordingComm:
        def __init__(self, group, *a, **k):
            pass

        def all_to_all(self, x, *a, **k):
            sent.append(id(x))
            raise Stop

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(comm_module, "Comm", RecordingComm)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    with pytest.raises(Stop):
        cal._link_worker("nccl", 1, [1 << 12], 1)
    assert four_gpus and four_gpus[0] == torch.device("cuda", 1), f"set_device calls: {four_gpus}"
    assert inits and inits[0][1].get("device_id") == torch.device("cuda", 1), f"init_process_group: {inits}"
    devices = dict(made)
    assert sent and devices[sent[0]] == torch.device("cuda", 1), "the all-to-all's message was not on cuda:1"


# ------------------------------------------------------------------------------------------------ item 5
def test_parallelize_refuses_a_cpu_module_in_an_nccl_group(monkeypatch, tiny_config):
    """Item 5: opendit.parallelize on an NCCL group with the module on CPU fails at once with one line saying how to
    set it up (before: it installed everything and failed at the first collective)."""
    import opendit
    from opendit.distributed.config import ParallelConfig
    from opendit.models.dit import DiT

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(OpenDiTError, match=r"cuda:LOCAL_RANK.*set_device\(1\)") as err:
        opendit.parallelize(DiT(tiny_config), ParallelConfig(ulysses=2))
    assert "\n" not in str(err.value)


def test_parallelize_refuses_two_ranks_on_one_gpu(monkeypatch):
    """Item 5: `pipe.to("cuda")` without set_device puts rank 1 on cuda:0; refused, naming set_device."""
    from opendit.parallel.entry import check_device_pairing

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(OpenDiTError, match=r"cuda:1.*torch.cuda.set_device\(1\)"):
        check_device_pairing(torch.device("cuda", 0), "nccl")
    with pytest.raises(OpenDiTError, match="gloo"):
        check_device_pairing(torch.device("cuda", 1), "gloo")
    check_device_pairing(torch.device("cpu"), "gloo")  # the CPU setup
    check_device_pairing(torch.device("meta"), "nccl")  # sharded loading fills the rank's device later
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    check_device_pairing(torch.device("cuda", 1), "nccl")  # the right setup


# ------------------------------------------------------------------------------------------------ item 6
def test_fewer_gpus_than_processes_is_an_error(monkeypatch, four_gpus):
    """Item 6: 8 local processes on 4 GPUs ran the whole job on CPU with gloo (a note in record.json only); now an
    error naming --device cpu, unless --device cpu is given."""
    from opendit.distributed.env import pick_device

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(OpenDiTError, match="--device cpu"):
        pick_device(None)
    assert pick_device("cpu") == (torch.device("cpu"), "gloo")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device(None) == (torch.device("cuda", 3), "nccl")


def test_fewer_gpus_is_refused_before_the_workers_start(monkeypatch, four_gpus):
    """Item 6, in the parent: the local pool checks before spawning; a machine without GPUs runs on CPU."""
    from opendit.distributed.env import check_visible_gpus

    with pytest.raises(OpenDiTError, match="8 processes on this node need 8 GPUs"):
        check_visible_gpus(8)
    check_visible_gpus(8, "cpu")
    check_visible_gpus(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_visible_gpus(8)  # a CPU machine: gloo, as before


def test_local_pool_refuses_a_shortfall_before_spawning(monkeypatch, four_gpus):
    """Item 6 through the engine: `--nproc 8` on 4 GPUs is refused by the local pool in the parent, before any worker
    process starts (no WorkerPool is created)."""
    from types import SimpleNamespace

    from opendit.distributed import launch
    from opendit.engine.executors import LocalPool

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(launch, "WorkerPool", no_pool)
    spec = SimpleNamespace(world=8, settings=SimpleNamespace(device=None), worker_bytes=lambda: 0)
    with pytest.raises(OpenDiTError, match="8 processes on this node need 8 GPUs.*--device cpu"):
        LocalPool(spec)


def test_one_gpu_pinned_per_process_is_not_a_shortfall(monkeypatch, four_gpus):
    """A launcher that pins one GPU per process (CUDA_VISIBLE_DEVICES naming one device) shows each rank 1 GPU:
    that rank's GPU is its cuda:0, not a shortfall."""
    from opendit.distributed.env import pick_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert pick_device(None) == (torch.device("cuda", 0), "nccl")


# ------------------------------------------------------------------------------------------------ item 8
def test_one_process_on_cuda_n_makes_it_current(four_gpus):
    """Item 8: `--device cuda:2` in one process calls set_device (CUDA events and streams then live on GPU 2)."""
    from opendit.distributed.env import single_device

    assert single_device("cuda:2") == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", 2)]
    assert single_device("cpu") == torch.device("cpu")


def test_machine_key_asks_this_ranks_gpu_not_gpu_0(monkeypatch, four_gpus):
    """Item 8: the calibration key (read under --dtype auto / --parallel auto / --memory-gib before set_device) names
    the rank's own GPU, never get_device_name(0) from every rank."""
    from opendit.planning import speeds as sp

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: asked.append(index) or "Simulated GPU")
    monkeypatch.setenv("LOCAL_RANK", "2")
    sp.machine_key("nccl", 1, 4)
    assert asked == [2]


# ------------------------------------------------------------------------------------------------ item 4
def test_half_precision_attention_falls_back_and_says_why(monkeypatch):
    """Item 4: ring / USP in bf16 on a GPU without the flash kernel fall back (flash -> efficient -> math) and the
    choice and its reason are recorded; simulated with the fused kernels replaced by ones that raise."""
    from opendit.parallel.attention import ring

    def unsupported(*args, **kwargs):
        raise RuntimeError("No available kernel (simulated)")

    monkeypatch.setattr(ring, "_cuda_flash_lse", unsupported)
    monkeypatch.setattr(ring, "_cuda_efficient_lse", unsupported)
    monkeypatch.setattr(ring, "KERNEL_CHOICES", {})
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)  # (B, H, S, D)
    out, lse = ring.lse_chain(q, q, q, device_type="cuda")
    ref_out, ref_lse = ring.attention_math_lse(q, q, q)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    choice = ring.attention_kernels()
    assert [c["kernel"] for c in choice] == ["math"]
    assert "flash" in choice[0]["reason"] and "efficient" in choice[0]["reason"]


def test_speeds_fallback_names_the_backend(monkeypatch, tmp_path):
    from opendit.planning import speeds as sp

    monkeypatch.setattr(sp, "CACHE_DIR", tmp_path)
    speeds = sp.load_speeds(backend="gloo")
    assert "--backend gloo" in speeds.source
    assert replace(speeds, source="") == replace(sp.DEFAULTS["cpu-gloo"], source="")


# ------------------------------------------------------------------------------------------------ item 2
class FakeCudaEvent:
    """torch.cuda.Event stand-in: each record() takes the next time from a shared script (milliseconds)."""

    script: list[float] = []

    def __init__(self, enable_timing=False):
        self.ms = None

    def record(self, stream=None):
        self.ms = FakeCudaEvent.script.pop(0)

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.ms - self.ms


def test_comm_waits_are_device_timed_on_cuda(monkeypatch):
    """Item 2: on NCCL wait() returns at once, so a host clock says ~0; with device timing the wait is the compute
    stream's stall between two CUDA events (here scripted: 7 ms), settled at the step's end."""
    from opendit.distributed.comm import CommHandle, CommStats

    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    FakeCudaEvent.script = [100.0, 107.0]
    stats = CommStats()
    stats.device_timing = True
    events = stats.enable_events()
    event = stats.record("all_to_all", 64)
    CommHandle([], lambda: "done", stats, "all_to_all", event=event).wait()
    assert stats.waited_s() == pytest.approx(0.007)
    assert events[0].blocked_s == pytest.approx(0.007)
    assert stats.end_step()["all_to_all"]["wait_s"] == pytest.approx(0.007)


def test_sampler_clock_synchronises_cuda_only(monkeypatch):
    """Item 2: the sampler's (and the pipeline loop's) clock synchronises the device before each reading on CUDA, so
    per-step times, model-call times and the balancer's busy time are the GPU's; on CPU it is perf_counter."""
    import time

    from opendit.diffusion.sampler import device_clock

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    assert device_clock("cpu") is time.perf_counter
    device_clock("cuda:1")()
    assert synced == [torch.device("cuda", 1)]
