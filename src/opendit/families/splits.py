"""The one applier of a family's split/gather plan, written in diffusers' `_cp_plan` vocabulary.

A plan maps a module path ("" = the root; `*` = every child of a ModuleList, as diffusers allows) to either
- {argument name or output index: ContextParallelInput(split_dim, expected_dims, split_output)}: the argument (before
  the module runs) or the output index (`split_output=True`, after it runs) is narrowed to this rank's contiguous
  block along `split_dim`; a tensor of another rank count is left whole, as diffusers does; or
- ContextParallelOutput(gather_dim, expected_dims) (or a list of them, one per output): the output is all-gathered
  over the sequence group along `gather_dim`.
Entries naming a module the instance does not have are skipped (diffusers' Helios plan names 40 blocks; a small
config has fewer): a plan is class data, an instance may be smaller.

Where OpenDiT differs from diffusers' own hooks:
- uneven is exact: L tokens over P ranks give ⌈L/P⌉ / ⌊L/P⌋ (split_sizes), never an assert on divisibility and
  never padding;
- the per-rank sizes that the attention kernels and the gathers need are learnt once per (site, global lengths)
  by one tiny all-gather of the local lengths over the sequence group (`SequenceState.sizes`), then cached: every
  rank records the same global lengths at the split points, so every rank asks the same questions in the same order;
- attention runs over the sequence group only while the tokens are split (`SequenceState.active`: set by a split,
  cleared by a gather), so an attention before the split point or after the gather runs as on one device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.parallel.sequence import offsets, split_sizes


@dataclass
class SequenceState:
    """Per-call facts of one module under sequence parallelism: the global length of every split tensor (keyed by its
    plan entry), whether tokens are split now, and the exchanged per-rank sizes (cached across calls)."""

    comm: object  # the exact (full-precision) Comm of the sequence group, sp order (ring_i * ulysses + ulysses_i)
    lengths: dict[str, int] = field(default_factory=dict)
    active: bool = False
    _sizes: dict[tuple, list[tuple[int, ...]]] = field(default_factory=dict)
    size: int = field(init=False)  # the sequence group's size and this rank's place in it: the comm's, fixed
    rank: int = field(init=False)

    def __post_init__(self) -> None:
        self.size, self.rank = self.comm.size, self.comm.rank

    def new_call(self) -> None:
        self.lengths.clear()
        self.active = False

    def attention_layout(self, site: str, query: torch.Tensor, key: torch.Tensor) -> tuple[str, list, list]:
        """How one attention call's streams lie over the ranks: ("split" | "gather_keys" | "local", q sizes,
        k sizes). Decided once per (site, global lengths) from every rank's token counts and fingerprints:
        - q and k each split (not the same on every rank) with equal per-rank counts: "split" (the kernel);
        - keys split, queries split differently or whole: "gather_keys" (all-gather K, V, attend locally);
        - keys whole on every rank (a stream the plan does not split, e.g. LTX-2's audio under its video split):
          "local" (local queries against every key)."""
        cache_key = ("layout", site, tuple(sorted(self.lengths.items())))
        if cache_key not in self._sizes:
            mine = [query.shape[1], key.shape[1], fingerprint(query), fingerprint(key)]
            every = self.comm.all_gather_values(mine, torch.float64)  # (P, 4), exchanged on the group's device
            q_sizes, k_sizes = [int(r[0]) for r in every], [int(r[1]) for r in every]
            q_whole = len({(r[0], r[2]) for r in every}) == 1
            k_whole = len({(r[1], r[3]) for r in every}) == 1
            if k_whole:
                mode = "local"
            elif not q_whole and q_sizes == k_sizes:
                mode = "split"
            else:
                mode = "gather_keys"
            self._sizes[cache_key] = [(mode, q_sizes, k_sizes)]
        mode, q_sizes, k_sizes = self._sizes[cache_key][0]
        if (query.shape[1], key.shape[1]) != (q_sizes[self.rank], k_sizes[self.rank]):
            raise OpenDiTError(
                f"{site}: this call holds {query.shape[1]} query / {key.shape[1]} key tokens where an earlier call "
                f"with the same split lengths held {q_sizes[self.rank]} / {k_sizes[self.rank]}"
            )
        return mode, q_sizes, k_sizes

    def sizes(self, site: str, local: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Every rank's `local` numbers at `site` (e.g. (q tokens, k tokens) of one attention call), in sp order.

        Exchanged once per (site, global lengths of this call) and cached; a collective over the sequence group, so
        every rank must call it at the same sites in the same order (they do: the model's control flow is the same).
        """
        key = (site, tuple(sorted(self.lengths.items())))
        if key not in self._sizes:
            every = self.comm.all_gather_values(local, torch.int64)  # (P, n), exchanged on the group's device
            self._sizes[key] = [tuple(int(v) for v in row) for row in every]
        found = self._sizes[key]
        if found[self.rank] != tuple(local):
            raise OpenDiTError(
                f"{site}: this call holds {tuple(local)} tokens where an earlier call with the same split lengths "
                f"held {found[self.rank]}; the model's token flow changed between calls with equal inputs"
            )
        return found


def fingerprint(x: torch.Tensor, tokens: int = 64) -> float:
    """A number that differs between two (B, S, ...) tensors unless they hold the same values (in practice): fp64
    sums of their first `tokens` tokens weighted by token and by channel index. Ranks compare it to tell a stream
    every rank holds whole (the same tokens everywhere) from one split over them (other tokens on each rank); the
    first tokens suffice for that, and keep the fp64 copy small at any sequence length."""
    x = x.detach()[:, :tokens].double()
    tokens = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device)
    channels = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device) ** 0.5
    by_token = x.sum(dim=[d for d in range(x.dim()) if d != 1])  # (S,)
    by_channel = x.sum(dim=list(range(x.dim() - 1)))  # (D,)
    return float((by_token * tokens).sum() + (by_channel * channels).sum())


def narrow(tensor, split, state: SequenceState, key: str):
    """(..., L, ...) along split.split_dim -> this rank's (..., L_r, ...) block (⌈L/P⌉ / ⌊L/P⌋); other objects and
    tensors of another rank count than split.expected_dims pass whole."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if split.expected_dims is not None and tensor.dim() != split.expected_dims:
        return tensor
    length = tensor.shape[split.split_dim]
    state.lengths[key] = length
    state.active = True
    sizes = split_sizes(length, state.size)  # OpenDiTError naming the fix when L < P
    return tensor.narrow(split.split_dim, offsets(sizes)[state.rank], sizes[state.rank])


def gather(tensor, output, state: SequenceState, site: str):
    """(..., L_r, ...) -> (..., L, ...) along output.gather_dim over the sequence group, rank blocks in order."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if output.expected_dims is not None and tensor.dim() != output.expected_dims:
        return tensor
    dim = output.gather_dim % tensor.dim()
    sizes = [row[0] for row in state.sizes(site, (tensor.shape[dim],))]
    return state.comm.all_gather(tensor.contiguous(), dim, sizes)


def matching_modules(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """(path, module) for a plan path with at most one `*`; [] where the instance has no such module."""
    if path == "":
        return [("", model)]
    modules = dict(model.named_modules())
    if "*" not in path:
        return [(path, modules[path])] if path in modules else []
    head, tail = path.split("*", 1)
    container = modules.get(head.rstrip("."))
    if container is None:
        return []
    found = []
    for index, _child in container.named_children():
        concrete = f"{head}{index}{tail}"
        if concrete in modules:
            found.append((concrete, modules[concrete]))
    return found


def _is_output(entry) -> bool:
    return not isinstance(entry, dict)


def _outputs(entry) -> list:
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def install_plan(model: nn.Module, plan: dict, state: SequenceState) -> list:
    """Hooks for every entry of `plan` (see the module docstring); returns their handles. A root pre-hook starts
    each call afresh."""
    handles = [model.register_forward_pre_hook(lambda _m, _a: state.new_call())]
    for path, entry in plan.items():
        for concrete, module in matching_modules(model, path):
            if _is_output(entry):
                handles.append(module.register_forward_hook(_gatherer(_outputs(entry), state, concrete)))
                continue
            inputs = {k: v for k, v in entry.items() if not v.split_output}
            outputs = {k: v for k, v in entry.items() if v.split_output}
            if inputs:
                hook = _input_splitter(module, inputs, state, path)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if outputs:
                handles.append(module.register_forward_hook(_output_splitter(outputs, state, path)))
    return handles


def plan_modules_missing(model: nn.Module, plan: dict) -> list[str]:
    """Plan paths without a `*` that the instance lacks entirely and whose siblings it has none of either (a wrong
    plan, not a smaller config): reported by the family check."""
    missing = []
    for path in plan:
        if not matching_modules(model, path) and "*" not in path and not _numbered_sibling(model, path):
            missing.append(path)
    return missing


def _numbered_sibling(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numbered:
        return False
    pattern = ".".join("*" if i == numbered[0] else p for i, p in enumerate(parts))
    return bool(matching_modules(model, pattern))


def _parameter_names(module: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(type(module).forward).parameters)[1:]  # without self


def _input_splitter(module: nn.Module, inputs: dict, state: SequenceState, path: str):
    names = _parameter_names(module)

    def hook(_module, args, kwargs):
        args = list(args)
        for name, split in inputs.items():
            key = f"{path}:{name}"
            if name in kwargs:
                kwargs[name] = _narrow_value(kwargs[name], split, state, key)
            elif name in names and names.index(name) < len(args):
                index = names.index(name)
                args[index] = _narrow_value(args[index], split, state, key)
        return tuple(args), kwargs

    return hook


def _narrow_value(value, split, state: SequenceState, key: str):
    if isinstance(value, (list, tuple)):  # (cos, sin) passed as one argument: a plan entry per element
        splits = split if isinstance(split, (list, tuple)) else [split] * len(value)
        return type(value)(narrow(v, s, state, f"{key}.{i}") for i, (v, s) in enumerate(zip(value, splits)))
    return narrow(value, split, state, key)


def _output_splitter(outputs: dict, state: SequenceState, path: str):
    def hook(_module, _args, output):
        if isinstance(output, torch.Tensor):
            return narrow(output, outputs[0], state, f"{path}:0") if 0 in outputs else output
        items = list(output)
        for index, split in outputs.items():
            items[index] = narrow(items[index], split, state, f"{path}:{index}")
        return type(output)(items) if isinstance(output, tuple) else items

    return hook


def _gatherer(outputs: list, state: SequenceState, path: str):
    def hook(_module, _args, output):
        if isinstance(output, torch.Tensor):
            result = gather(output, outputs[0], state, f"{path}:out")
        else:
            items = list(output)
            if len(items) != len(outputs):
                raise OpenDiTError(f"{path}: the plan gathers {len(outputs)} outputs, the module returned {len(items)}")
            items = [o if spec is None else gather(o, spec, state, f"{path}:out{i}") for i, (o, spec) in
                     enumerate(zip(items, outputs))]  # fmt: skip
            result = type(output)(items) if isinstance(output, tuple) else items
        state.active = False
        return result

    return hook
