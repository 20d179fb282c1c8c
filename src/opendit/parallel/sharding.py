"""Sharded weights (`--shard-weights`): each rank of the sequence-parallel group stores 1/P of every parameter and
gathers a piece of the model just before it runs, prefetching the next piece while the current one computes.

Built on torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), used for inference: it works on gloo/CPU device meshes
and on NCCL, and its all-gather is an exact copy, so sharded output equals unsharded output bitwise (test_shard.py).

Units (each one `fully_shard` call = one all-gather when it runs) come from the model's spec (`shard_units`,
models/spec.py), in forward order; DiT's (models/dit.py) are:

    root (pos_embed, x_embedder) -> t_embedder -> y_embedder
    -> for each block: adaLN_modulation (6C^2) -> attn (qkv + proj, 4C^2) -> mlp.fc1 (4C^2) -> mlp.fc2 (4C^2)
    -> final_layer

Why a block is four units and not one (18C^2 parameters): FSDP2 all-gathers a unit into a flat buffer and then copies
it out into the parameters, so a unit being gathered briefly costs 2x its size; small units keep those transients
small. On gloo the all-gather is `WeightAllGather` (one in-place broadcast per source rank): gloo's own
all_gather_into_tensor stages the whole output in one more buffer (3x per unit), which cost 0.2-0.3 blocks of peak.
Measured on gloo (tests/test_shard.py, hidden 768, per-rank peak resident set during a forward):
1/P of the model + 0.90 blocks with prefetch (the default: the next unit's all-gather is issued when the current unit
starts, so it overlaps compute), 1/P + 0.99 blocks without (FSDP2 then keeps the previous unit's gather buffer until
the next copy-out). `attn` stays whole because FastSeq reads qkv's weight directly instead of calling the qkv module
(the hook that gathers it would not fire). FastSeq caches its per-head qkv slice (3C^2/P per block) across forwards,
which stays resident on top of the 1/P shards. The root unit (pos_embed (1, T, C) and the patch embedder) is gathered
for the embedding only: a pre-hook on the first child unit reshards it (FSDP2 would keep it until the root's forward
ends, and by default even after it).

Placement: FSDP2 shards dim 0, padded to a multiple of P; parameters with fewer rows than ranks (pos_embed (1, T, C))
are sharded along their largest dim that P divides instead (`_placement_for`), else every rank would hold them whole.

Dtypes: parameters are sharded and gathered in their storage dtype (the compute dtype after loading), never through
`comm_dtype`, so that sharding is exact. No MixedPrecisionPolicy is used.

For the runtime (parallel/apply.py), once per process, after the weights are loaded in their final dtype and
device and after the parallel attention / token shard / FastSeq modules are installed:

    from opendit.parallel.sharding import apply_weight_sharding
    if plan.shard_weights:
        apply_weight_sharding(model, runtime.comms["sp"])  # Comm, ProcessGroup or 1-D DeviceMesh of the sp ranks;
        # units: the model spec's shard units (default), in forward order

Then call `model(x, t, y)` as before, under torch.no_grad() (not inference_mode), in lockstep on every rank of that
group (every forward all-gathers over it). Anything that caches weight tensors at install time (e.g. per-head slices
of qkv) must be built before sharding is applied, or read the weights inside forward, where they are gathered.
`sharded_parameter_bytes(model)` gives this rank's resident parameter bytes, for the record.
Memory readers (resident set, high-water mark, exact_malloc) are in opendit/observe/memory.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendit.distributed.comm import all_gather_single
from opendit.errors import OpenDiTError


def _as_mesh(group_or_mesh: Any, device_type: str):
    """A 1-D DeviceMesh over a ProcessGroup or an opendit Comm's group (a 1-D DeviceMesh passes through)."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group_or_mesh, DeviceMesh):
        if group_or_mesh.ndim != 1:
            raise OpenDiTError(
                f"weight sharding needs a 1-D mesh (the sequence-parallel ranks), got a {group_or_mesh.ndim}-D mesh "
                f"{group_or_mesh.mesh_dim_names}; pass runtime.sp_mesh, or a 1-D slice such as mesh['ulysses']"
            )
        if group_or_mesh.device_type != device_type:
            raise OpenDiTError(
                f"the mesh is on {group_or_mesh.device_type} but the model is on {device_type}; "
                "build the mesh for the model's device type"
            )
        return group_or_mesh
    group = getattr(group_or_mesh, "group", group_or_mesh)  # an opendit Comm carries its process group
    if group is None:
        raise OpenDiTError("apply_weight_sharding needs the sequence-parallel process group, Comm or 1-D DeviceMesh")
    return DeviceMesh.from_group(group, device_type)


def apply_weight_sharding(
    model: nn.Module,
    group_or_mesh: Any,
    *,
    prefetch: bool = True,
    units: list[nn.Module] | None = None,
    stats: Any = None,
    root_used_after_units: bool = False,
    split_root: bool = False,
) -> None:
    """Shard `model`'s parameters in place over `group_or_mesh` (ProcessGroup, opendit Comm or 1-D DeviceMesh, P ranks).
    The weight all-gathers are counted in `stats` (a CommStats; default: an opendit Comm's own).
    `root_used_after_units`: the root's own parameters are read after the units ran (a diffusers transformer's
    norm_out / proj_out), so they stay gathered for the whole forward; with `split_root` too, the root's large
    children become units of their own (`root_parts`) and only its own parameters stay gathered.

    Each rank keeps 1/P of every parameter (dim 0, FSDP2 layout); each unit is all-gathered just before its forward
    and freed after it; with `prefetch` the next unit's all-gather is issued when the current unit starts (async on
    gloo and NCCL, so it overlaps compute). P == 1 leaves the model untouched. The model must be in its final dtype
    and device, or wholly on `meta` (with a DeviceMesh): then no memory is used, and `sharded_loading.fill_sharded`
    materialises and fills the local shards from the checkpoint. Its class becomes FSDP2's subclass of it and its
    parameters DTensors; the forward signature and results are unchanged. Calling it again does nothing.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise OpenDiTError("weight sharding needs torch.distributed: launch with opendit --nproc N (or torchrun)")
    if is_sharded(model):
        return  # already sharded (idempotent: FSDP2 cannot shard a module twice)
    params = list(model.parameters())
    if not params:
        raise OpenDiTError("the model has no parameters to shard")
    mesh = _as_mesh(group_or_mesh, _device_type(params, group_or_mesh))
    if mesh.size() == 1:
        return
    if units is None:  # the model's declared shard units, in forward order (models/spec.py)
        from opendit.models.spec import spec_for

        spec = spec_for(model)
        units = spec.shard_unit_modules(model)
        root_used_after_units = root_used_after_units or spec.root_used_after_embedding
    placement = _placement_for(mesh.size())
    # the root's large children (embedders, final projections) as units of their own, out of the prefetch chain
    # (their forward order around the blocks is the model's own): gathered while they run, not all forward
    side = root_parts(model, units) if split_root and root_used_after_units and units else []
    for unit in [*side, *reversed(units)]:  # bottom-up: a nested unit (split_block_units) before its parent
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, shard_placement_fn=placement)
    # the rest: pos_embed, x_embedder
    fully_shard(model, mesh=mesh, reshard_after_forward=True, shard_placement_fn=placement)
    model.set_reshard_after_forward(True, recurse=False)  # FSDP2 keeps a root gathered after forward by default
    chain = [model, *units]
    stats = stats if stats is not None else getattr(group_or_mesh, "stats", None)
    gather = WeightAllGather(dist.get_backend(mesh.get_group()) == "gloo", stats)
    for unit in [*chain, *side]:
        unit.set_custom_all_gather(gather)
    if prefetch:
        for current, following in zip(chain, chain[1:]):
            current.set_modules_to_forward_prefetch([following])
    if units and not root_used_after_units:
        # The root's own parameters (pos_embed (1, T, C) and the patch embedder) serve only the embedding, which runs
        # before the first child unit; FSDP2 would keep them gathered until the root's forward ends (72 MiB at
        # 16384 tokens, XL width, fp32). Free them when the first unit starts.
        units[0].register_forward_pre_hook(lambda _module, _args: model.reshard())


def split_block_units(blocks: list[nn.Module]) -> list[nn.Module]:
    """Finer FSDP2 units for a list of blocks, in forward order: a block larger than nothing splits into its called
    parts (its direct children holding parameters; a ModuleList / ModuleDict, which has no forward for a hook to
    fire on, stands for its items: T5's block.layer), each part again while it holds over 1/PART_CAP of the block
    (a feed-forward of two or three linears), preceded by the module itself when parameters are left to it (its
    own, PixArt's scale_shift_table (6, C), and its parts under 1/SMALL_PART of the block: norms), which FSDP2
    then gathers without its parts'. Why: a unit being gathered costs about 2.5x its size on CPU (the all-gather
    output, the parameters copied out of it, the local shard's copy in) plus the next unit's prefetch, so a PixArt
    block of 37 MiB at width 768 (attn1 9 MiB, attn2 9 MiB, ff 18 MiB) peaked at ~3 blocks above the shards, and
    its parts peak at ~3 of its largest part. Parts are modules their parent calls (their own forward hooks gather
    them); a parameter a module reads itself stays in that module's unit."""
    units: list[nn.Module] = []
    for block in blocks:
        units.extend(_split(block, _numel(block) / PART_CAP, _numel(block) / SMALL_PART))
    return units


PART_CAP = 2.5  # a part above 40 % of its block's parameters is split again (where it has parts of its own)
SMALL_PART = 16  # a part under 1/16 of its block's parameters stays in its parent's unit


def _split(module: nn.Module, cap: float, small: float) -> list[nn.Module]:
    size = _numel(module)
    parts = [part for part in _called_children(module) if _numel(part) >= small]
    if not parts or (len(parts) == 1 and size <= cap):
        return [module]
    rest = size - sum(_numel(part) for part in parts)
    inner = [unit for part in parts for unit in (_split(part, cap, small) if _numel(part) > cap else [part])]
    return [module, *inner] if rest else inner


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _called_children(module: nn.Module) -> list[nn.Module]:
    found = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            found.extend(item for item in child.children() if _numel(item))
        elif _numel(child):
            found.append(child)
    return found


def root_parts(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """The root's own children that can be units of their own when the root stays gathered for the whole forward
    (a diffusers transformer reads its scale_shift_table / norm_out after the blocks): each child holding at least
    1/SMALL_PART of the root's remaining parameters, no unit's parameters and no parameter tied to another module
    (FSDP2 keeps a tie only within one unit). PixArt width 768: adaln_single (a 768 -> 6 x 768 linear, 13.5 MiB)
    and caption_projection (4.5 MiB) were gathered through every step's whole forward; on their own they are
    gathered only while they run. A ModuleList / ModuleDict child is left to the root (Z-Image indexes its
    embedders' ModuleDict: no forward hook would fire on it)."""
    in_units = {id(p) for unit in units for p in unit.parameters()}
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    rest = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    found = []
    for child in model.children():
        params = list(child.parameters())
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or not params:
            continue
        if any(id(p) in in_units or holders[id(p)] > 1 for p in params):
            continue
        if sum(p.numel() for p in params) * SMALL_PART >= rest:
            found.append(child)
    return found


def _device_type(params: list[nn.Parameter], group_or_mesh: Any) -> str:
    """The device type of the mesh to shard over: the parameters', or for a model wholly on meta (sharded loading:
    FSDP2 is applied on meta, fill_sharded materialises the local shards) the DeviceMesh's own."""
    on_meta = [p.is_meta for p in params]
    if any(on_meta) and not all(on_meta):
        raise OpenDiTError("the model is partly on the meta device: load every weight, or build it wholly on meta")
    if not all(on_meta):
        return params[0].device.type
    device_type = getattr(group_or_mesh, "device_type", None)
    if device_type is None:
        raise OpenDiTError("a model on meta is sharded over a DeviceMesh (it says the device type), not a group")
    return device_type


def _placement_for(world: int):
    """FSDP2 shards dim 0 by default, padding it to a multiple of P: a parameter with fewer than P rows, such as
    pos_embed (1, T, C), would then sit whole on every rank (72 MiB at 16384 tokens, XL width, fp32). Such parameters
    are sharded on their largest dim that P divides (FSDP2 needs even shards off dim 0), else left on dim 0."""
    from torch.distributed.tensor import Shard

    def placement(param: nn.Parameter):
        if param.dim() < 2 or param.shape[0] >= world:
            return None  # FSDP2's default, Shard(0)
        even = [d for d in range(1, param.dim()) if param.shape[d] % world == 0]
        return Shard(max(even, key=lambda d: param.shape[d])) if even else None

    return placement


class WeightAllGather:
    """FSDP2's all-gather of a unit's flat shards (1-D output of P x n elements), counted in the runtime's CommStats
    (kind "weight_gather": bytes this rank sends, (P-1) x n x itemsize, and time blocked waiting for it, which is what
    --balance-tokens subtracts from busy time).

    On gloo (`in_place=True`) it is one broadcast per source rank, straight into that rank's slice of the output:
    gloo's all_gather_into_tensor stages the whole output in a second buffer (measured: +P x n elements resident while
    it runs), which made every gathered unit cost 3x its size; broadcast reads and writes the tensor's own memory.
    Same bytes on the wire, P collectives instead of one. Elsewhere (NCCL writes in place) all_gather_into_tensor."""

    kind = "weight_gather"

    def __init__(self, in_place: bool, stats=None):
        self.in_place, self.stats = in_place, stats

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = input_tensor.numel()
        if output_tensor.numel() != world * n:
            raise OpenDiTError(f"all-gather output has {output_tensor.numel()} elements, expected {world} x {n}")
        nbytes = (world - 1) * n * input_tensor.element_size()
        # the event (None unless the stats' event log is on) links this issue to the wait in _AllWorks
        event = self.stats.record(self.kind, nbytes) if self.stats is not None else None
        if self.in_place:
            slices = [output_tensor.narrow(0, source * n, n) for source in range(world)]  # P x (n,), views
            if slices[rank].data_ptr() != input_tensor.data_ptr():  # FSDP2 copies its input in place; else do it
                slices[rank].copy_(input_tensor.reshape(-1))
            works = [
                dist.broadcast(part, src=dist.get_global_rank(group, source), group=group, async_op=True)
                for source, part in enumerate(slices)
            ]
        else:
            works = [all_gather_single(output_tensor, input_tensor, group=group, async_op=True)]
        work = _AllWorks(works, self.stats, self.kind, event)
        if not async_op:
            work.wait()
            return None
        return work


class _AllWorks(dist.Work):
    """One Work over several in-flight collectives (FSDP2 waits on a single Work); the wait is timed into stats, and
    into `event` (the CommEvent stats.record returned at issue, when its event log is on)."""

    def __init__(self, works, stats, kind: str, event=None):
        super().__init__()
        self._works, self._stats, self._kind, self._event = works, stats, kind, event

    def wait(self, timeout=None) -> bool:
        begun = self._stats.wait_begin() if self._stats is not None else None
        for work in self._works:
            work.wait()
        if self._stats is not None:
            self._stats.wait_end(self._kind, begun, event=self._event)  # device time on CUDA (comm.py)
        return True


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sharded_parameter_bytes(model: nn.Module) -> int:
    """This rank's resident parameter bytes: local shards of sharded parameters, full size of the others."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.untyped_storage().nbytes() if local.numel() else 0
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the full (unsharded) model: sum of numel x element size over all parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
