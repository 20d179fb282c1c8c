"""DSP (Dynamic Sequence Parallelism, introduced with OpenDiT's video work): switch the split dimension of a video
between the two kinds of block instead of exchanging attention heads inside each.

A video DiT's hidden state is (B, F, T, C). Spatial blocks attend within a frame, temporal blocks across frames at
one position. DSP keeps, on sequence rank r, F_r whole frames for the spatial blocks (their attention is local) and
T_r whole positions for the temporal blocks (local too), and moves between the two layouts with ONE all-to-all at
each switch: 2 per spatial + temporal pair, each carrying the hidden state once. Ulysses on the same model (positions
split) needs 2 all-to-alls in every spatial block carrying q, k, v and the output: 4 hidden-state volumes per pair.

Uneven is exact: frames split ⌈F/P⌉ / ⌊F/P⌋, positions likewise (comm.all_to_all takes any sizes). Every rank needs
at least one frame and one position, so the degree is at most min(F, T); a larger one is an error naming the valid
degrees (and Ulysses, which splits positions only).

The model declares where to switch (its spec's `frame_split`, models/spec.py); nothing here names a model's modules.
"""

from __future__ import annotations

from opendit.errors import OpenDiTError
from opendit.models.attention import local_attention
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy, register
from opendit.parallel.sequence import TokenGather, TokenShard, split_sizes


def dsp_sizes(frames: int, positions: int, degree: int) -> tuple[list[int], list[int]]:
    """(frames per rank, positions per rank) for a DSP degree, or OpenDiTError naming the valid degrees."""
    limit = min(frames, positions)
    if degree > limit:
        what = f"{frames} frames" if frames <= positions else f"{positions} positions per frame"
        raise OpenDiTError(
            f"dsp degree {degree} exceeds the model's {what}: every rank needs a whole frame for the spatial blocks "
            f"and a position for the temporal ones; use a dsp degree of at most {limit} "
            f"(valid: {', '.join(map(str, range(2, limit + 1))) or 'none'}) or --sp-impl ulysses, which splits "
            "positions only"
        )
    return split_sizes(frames, degree), split_sizes(positions, degree)


def dsp_bytes(frame_sizes: list[int], position_sizes: list[int], batch: float, hidden: int, rank: int, itemsize: int):
    """Bytes rank r sends per spatial + temporal pair (CommStats convention: to other ranks only): to_temporal sends
    its F_r frames at the other ranks' positions, to_spatial its T_r positions of the other ranks' frames:
    itemsize * B * C * (F_r * (T - T_r) + T_r * (F - F_r))."""
    f, t = sum(frame_sizes), sum(position_sizes)
    f_r, t_r = frame_sizes[rank], position_sizes[rank]
    return itemsize * batch * hidden * (f_r * (t - t_r) + t_r * (f - f_r))


class DSPStrategy(SequenceStrategy):
    """`--sp-impl dsp` on the Ulysses dimension of the mesh (the innermost, fastest links)."""

    name = "dsp"
    summary = "video: spatial blocks split over frames, temporal over positions; 1 all-to-all per switch (2 per pair)"
    uses = ("ulysses",)
    splits_heads = False
    layout = "frames"

    def check(self, plan, dims) -> list[str]:
        if plan.balance_tokens or plan.token_shares is not None:
            raise OpenDiTError("dsp splits frames and positions evenly; drop --balance-tokens / token shares")
        if dims.sequences <= 1:
            raise OpenDiTError(
                "--sp-impl dsp switches between a frame split and a position split: it needs a video model "
                "(spatial and temporal blocks); for image models use ulysses, ring, usp or fastseq"
            )
        dsp_sizes(dims.sequences, dims.num_tokens, plan.ulysses)
        return []

    def install(self, modules: list, runtime, sizes: list[int]) -> None:
        for module in modules:  # every attention is local under DSP
            module.core = local_attention

    def install_model(self, model, spec, runtime) -> list:
        """The frame split, the switches and the frame gather as forward hooks; returns their handles."""
        points = spec.frame_split
        if points is None:
            raise OpenDiTError(
                f"--sp-impl dsp needs a model with spatial and temporal blocks (a video DiT); {type(model).__name__} "
                "has none: use ulysses, ring, usp or fastseq"
            )
        frame_sizes, position_sizes = dsp_sizes(
            points.frames(model.config), points.positions(model.config), runtime.plan.ulysses
        )
        self.install(spec.attention_modules(model), runtime, position_sizes)
        comm, modules, hooks = runtime.comms["ulysses"], dict(model.named_modules()), []

        def hook(path, fn):
            hooks.append(modules[path].register_forward_hook(lambda _m, _args, out: fn(out)))

        for path, dim in points.frame_split.items():  # raw patches (B, F, T, P) -> (B, F_r, T, P)
            hook(path, TokenShard(comm, frame_sizes, dim))
        for path in points.to_temporal:  # (B, F_r, T, C) -> (B, F, T_r, C): scatter positions, gather frames
            hook(path, lambda x: comm.all_to_all(x, 2, 1, position_sizes, frame_sizes))
        for path in points.to_spatial:  # (B, F, T_r, C) -> (B, F_r, T, C): scatter frames, gather positions
            hook(path, lambda x: comm.all_to_all(x, 1, 2, frame_sizes, position_sizes))
        for path, dim in points.frame_gather.items():  # (B, F_r, T, out) -> (B, F, T, out), full precision
            hook(path, TokenGather(runtime.exact("ulysses"), frame_sizes, dim))
        return hooks

    # cost model: one block = half a spatial + temporal pair (the spec's block_flops averages the pair the same way)
    def block_work(self, dims, plan, batch, sizes, rank) -> AttentionWork:
        frame_sizes = split_sizes(dims.sequences, plan.ulysses)
        # spatial attention: F_r whole frames of T x T, all heads = the spec's F-frame view with heads * F_r / F
        heads = dims.num_heads * frame_sizes[rank] / dims.sequences
        return AttentionWork(q_tokens=sum(sizes), heads=heads, qkv_rows=sizes[rank], dispatch_ops=0.1)

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s) -> list[CommItem]:
        """`batch`: the cost model passes sequences of the split attention, B * F; DSP's formula counts videos."""
        frame_sizes = split_sizes(dims.sequences, plan.ulysses)
        videos = batch / dims.sequences
        pair = dsp_bytes(frame_sizes, sizes, videos, dims.hidden_size, rank, itemsize)
        return [CommItem("all_to_all", pair / 2, 1, plan.ulysses)]

    def buffers(self, dims, plan, batch, sizes, itemsize) -> float:
        """Send + receive of one switch: two (B, F_r, T, C)-sized buffers."""
        f_r = max(split_sizes(dims.sequences, plan.ulysses))
        return 2 * batch * f_r * sum(sizes) * dims.hidden_size * itemsize


register(DSPStrategy())
