"""The adaptive first-block cache (`--cache fbcache`), per sample and shard-aware.

Per model call (slot) and per sample b (a row of the model's batch: an image or video; under our sampler's guidance
its cond and uncond rows get the same summed metric, StepCache._pair_branches, so they decide together):
- the head block (block 0) always runs; its residual r_b = out - in (the image stream) is compared with r_b at b's
  last full step: d_b = |r_b - r_prev_b|_1 / |r_prev_b|_1, both sums over b's tokens on this rank, all-reduced over
  the sequence group (fp64) so every rank of the group decides the same;
- b reuses when d_b < threshold, it has reused fewer than `max_reuse` times in a row, and the step is not one of the
  first or last `guard_steps`; otherwise it computes;
- the cached span, blocks 1..K, is then skipped for b: the middle blocks pass b's tokens through and the span's last
  block K adds R_b, the residual the span added at b's last full step (R = out_K - out_0, per stream: image tokens and,
  for joint-attention blocks, the text tokens). Blocks after K always run.
K is the last block of the head's kind: the whole chain for image models; for the video DiT (spatial / temporal
blocks alternate, and the two kinds see the tokens in different layouts, (B*F, T, C) vs (B*T, F, C)) the last spatial
block, so R is taken in one layout and the final temporal block runs on every step.
When only some samples reuse, the span's blocks run on the computing samples' rows (rows of a sample are contiguous:
every block's batch is sample-major, (B*k, ...)), every rank of a sequence group on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from opendit.cache.registry import CacheMethod, register_cache_method

_TINY = 1e-30


@dataclass
class _SlotState:
    prev_residual: torch.Tensor | None = None  # (rows_0, ...) head residual at each sample's last full step
    prev_norm: torch.Tensor | None = None  # (B,) fp64 |prev_residual|_1 per sample over this rank's tokens
    span_residual: tuple | None = None  # (image (rows_K, ...), text or None): out_K - out_0 at the last full step
    streak: torch.Tensor | None = None  # (B,) consecutive reuses
    head_out: tuple | None = None  # (image, text) out of block 0, this call
    reuse: torch.Tensor | None = None  # (B,) bool, this call; None when every sample computes
    every: bool = False  # every sample reuses, this call
    compute_index: torch.Tensor | None = None  # (k*m,) long: the rows of the samples that compute, this call


class BlockCache:
    def __init__(self, owner):
        self.owner, self.config = owner, owner.config
        layout = owner.layout
        kinds = block_kinds(layout)
        self.span_end = span_end(layout)
        self.skippable = self.span_end  # blocks 1..K
        # blocks of one kind see the tokens in one layout: a mixed call may carry only the computing samples' rows
        # from block 1 to block K (the video DiT's span alternates layouts: there each block merges its rows back)
        self.compact = len(set(kinds[: self.span_end + 1])) == 1
        self.slots: dict[int, _SlotState] = {}
        for index, (_path, module, io) in enumerate(layout.blocks[: self.span_end + 1]):
            role = "head" if index == 0 else ("tail" if index == self.span_end else "middle")
            owner.wrap(module, self._forward(module.forward, io, role))

    def reset(self) -> None:
        self.slots.clear()

    def _state(self) -> _SlotState:
        return self.slots.setdefault(self.owner.slot, _SlotState())

    def _forward(self, forward, io, role: str):
        def head(*args, **kwargs):
            out = forward(*args, **kwargs)
            self._decide(io.inputs(args, kwargs)[0], io.outputs(out))
            return out

        def span(*args, **kwargs):
            state = self._state()
            reuse = state.reuse
            if reuse is None:  # every sample computes this call
                out = forward(*args, **kwargs)
                if role == "tail":
                    state.span_residual = _minus(io.outputs(out), state.head_out)
                return out
            if state.every:  # every sample reuses: the middle blocks pass the tokens through, block K adds R
                streams = io.inputs(args, kwargs)
                if role == "tail":
                    streams = self._finish_span(state, streams, reuse, True)
                return io.pack(*streams, None)
            if self.compact and self.owner.compact_call:
                return self._compact_forward(forward, io, role, state, args, kwargs)
            return self._merged_forward(forward, io, role, state, args, kwargs)

        return head if role == "head" else span

    def _compact_forward(self, forward, io, role, state, args, kwargs):
        """A mixed call on a chain of like blocks: the first skipped block takes the computing samples' rows, the
        blocks after it get them as they come (k of B samples' rows, (k*m, ...)), and block K scatters them back
        into the full batch once; the per-row extras (conditioning, text) are taken at every block."""
        index, rows_0 = state.compute_index, state.head_out[0].shape[0]
        out = forward(*_take(args, index, rows_0), **_take(kwargs, index, rows_0))  # streams (k*m, ...)
        if role != "tail":
            return out
        streams = []
        for part, head, cached in zip(io.outputs(out), state.head_out, state.span_residual):
            if part is None or head is None or cached is None:  # e.g. SD3's last block returns no text tokens
                streams.append(None)
                continue
            rows = index if head.shape[0] == rows_0 else torch.nonzero(_rows(~state.reuse, head.shape[0])).flatten()
            full = head + cached  # (rows, ...): the reusing samples' out_0 + R
            full.index_copy_(0, rows, part.to(full.dtype))
            # R refreshed in place for the computing samples (R is ours: made by _minus / _finish_span)
            cached.index_copy_(0, rows, (part - head.index_select(0, rows)).to(cached.dtype))
            streams.append(full)
        return io.pack(*streams, out)

    def _merged_forward(self, forward, io, role, state, args, kwargs):
        """A mixed call where the blocks between may change the tokens' layout (the video DiT): every skipped
        block runs on the computing samples' rows and merges them back into the full batch."""
        reuse = state.reuse
        hidden, text = io.inputs(args, kwargs)
        rows = hidden.shape[0]  # this block's layout: (B*F, ...) or (B*T, ...) for the video DiT
        index = torch.nonzero(~_rows(reuse, rows)).flatten()  # (computing rows,)
        out = forward(*_take(args, index, rows), **_take(kwargs, index, rows))
        streams = tuple(
            _merge(full, part, _rows(reuse, full.shape[0])) if full is not None and part is not None else None
            for full, part in zip((hidden, text), io.outputs(out))
        )
        if role == "tail":
            streams = self._finish_span(state, streams, reuse, False)
        return io.pack(*streams, out)

    def _decide(self, hidden_in: torch.Tensor, head_out: tuple) -> None:
        owner, config, state = self.owner, self.config, self._state()
        batch, record = owner.batch, owner.call_record
        residual = head_out[0] - hidden_in  # (rows_0, ...), rows_0 = B x (frames on this rank, or 1)
        reuse = torch.zeros(batch, dtype=torch.bool, device=residual.device)
        step, n, guard = owner.step, owner.num_steps, config.guard_steps
        guarded = step < guard or step >= n - guard
        if state.streak is None or state.streak.shape[0] != batch:
            state.streak = torch.zeros(batch, dtype=torch.long, device=residual.device)
        metric = None
        comparable = state.prev_residual is not None and state.prev_residual.shape == residual.shape
        if comparable:
            # per-sample L1 sums over this rank's tokens, (B,) each: accumulated in fp32 over the sample's local
            # elements, then fp64 for the sums over ranks and branches; |r_prev|_1 was kept from r_prev's step
            diff = _l1_per_sample(residual - state.prev_residual, batch)
            sums = owner.reduce_sum(torch.stack([diff, state.prev_norm], 1))  # (B, 2) fp64
            metric = sums[:, 0] / sums[:, 1].clamp_min(_TINY)
            if not guarded and state.span_residual is not None:
                reuse = (metric < config.threshold) & (state.streak < config.max_reuse)
        replay = owner.replay
        if replay is not None and step < len(replay) and owner.slot < len(replay[step]):
            forced = torch.tensor(replay[step][owner.slot], dtype=torch.bool, device=residual.device)
            if forced.any() and (guarded or state.span_residual is None):
                from opendit.errors import OpenDiTError

                raise OpenDiTError(f"replayed decisions reuse at step {step}, where nothing can be reused")
            reuse = forced
        reused = torch.nonzero(reuse).flatten().tolist()
        state.every = len(reused) == batch
        mixed = bool(reused) and not state.every
        state.compute_index = torch.nonzero(_rows(~reuse, residual.shape[0])).flatten() if mixed else None
        self._keep_residual(state, residual, reuse, comparable and bool(reused))
        state.streak = torch.where(reuse, state.streak + 1, torch.zeros_like(state.streak))
        state.head_out, state.reuse = head_out, (reuse if reused else None)
        record["reused_samples"] = reused
        record["blocks_skipped"] += len(reused) * self.skippable
        if metric is not None:
            record["metric"] = [round(v, 6) for v in metric.tolist()]

    @staticmethod
    def _keep_residual(state: _SlotState, residual: torch.Tensor, reuse: torch.Tensor, keep_old: bool) -> None:
        """Computing samples refresh r_prev (and its norm); reusing samples keep the one of their last full step
        (`keep_old`: some sample reuses and the old r_prev fits this call)."""
        if not keep_old:  # every sample takes the new residual
            state.prev_residual, state.prev_norm = residual, _l1_per_sample(residual, reuse.shape[0])
            return
        if state.every:
            return
        index = state.compute_index  # (k*m,) the computing samples' rows
        fresh = residual.index_select(0, index)  # (k*m, ...)
        state.prev_residual.index_copy_(0, index, fresh)  # in place: r_prev is ours (a residual made in _decide)
        samples = torch.nonzero(~reuse).flatten()  # (k,)
        state.prev_norm = state.prev_norm.index_copy(0, samples, _l1_per_sample(fresh, samples.shape[0]))

    def _finish_span(self, state: _SlotState, streams: tuple, reuse: torch.Tensor, every: bool) -> tuple:
        """At block K: reusing rows get out_0 + R; computing rows refresh R = out_K - out_0."""
        if every:  # the whole call reuses: out_0 + R, and R stays as it was
            return tuple(
                None if s is None or h is None or c is None else h + c
                for s, h, c in zip(streams, state.head_out, state.span_residual)
            )
        out = []
        for stream, head, cached in zip(streams, state.head_out, state.span_residual):
            if stream is None or head is None or cached is None:  # e.g. SD3's last block returns no text tokens
                out.append(None)
                continue
            rows = _bcast(_rows(reuse, stream.shape[0]), stream)
            out.append(torch.where(rows, head + cached, stream))
        fresh = _minus(tuple(out), state.head_out)
        state.span_residual = tuple(
            None if f is None or c is None else torch.where(_bcast(_rows(reuse, f.shape[0]), f), c, f)
            for f, c in zip(fresh, state.span_residual)
        )
        return tuple(out)


def _l1_per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """(rows, ...) -> (batch,) fp64: |values|_1 per sample over its local elements (rows are sample-major)."""
    accumulate = torch.float64 if values.dtype == torch.float64 else torch.float32
    return values.abs().reshape(batch, -1).sum(1, dtype=accumulate).double()


def block_kinds(layout) -> list[str]:
    """Each block's kind: the kinds of its attention over the tokens, and whether it returns a text stream of its
    own (a joint block) or one stream (FLUX.2's single-stream blocks return [text; image] as one tensor, so a span
    residual out_K - out_0 cannot cross from its joint blocks into them)."""
    kinds = []
    for block_path, _m, io in layout.blocks:
        found = {kind for path, _m, kind in layout.attention if path.startswith(block_path + ".") and kind != "cross"}
        kinds.append((",".join(sorted(found)) or "block") + ("" if io.out_encoder is None else "+text"))
    return kinds


def span_end(layout) -> int:
    """K: the last block of the head block's kind (the cached span is blocks 1..K); refused where there is none."""
    kinds = block_kinds(layout)
    end = max(i for i, k in enumerate(kinds) if k == kinds[0])
    if end == 0:
        from opendit.errors import OpenDiTError

        raise OpenDiTError(
            f"{layout.family}: the first-block cache reuses the residual of a span of blocks like the first one, and "
            f"{layout.blocks[0][0]} is the only one of its kind ({kinds[0]}); use --cache pab, or no cache"
        )
    return end


def _rows(per_sample: torch.Tensor, rows: int) -> torch.Tensor:
    """(B,) per-sample flags -> (rows,) per-row flags; a block's batch is sample-major, rows = B x k."""
    batch = per_sample.shape[0]
    if rows % batch:
        from opendit.errors import OpenDiTError

        raise OpenDiTError(f"a block's batch of {rows} rows is not a multiple of the model's batch {batch}")
    return per_sample.repeat_interleave(rows // batch)


def _bcast(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.reshape(-1, *([1] * (like.dim() - 1)))


def _minus(streams: tuple, base: tuple) -> tuple:
    return tuple(None if s is None or b is None else s - b for s, b in zip(streams, base))


def _merge(full: torch.Tensor, part: torch.Tensor, reuse_rows: torch.Tensor) -> torch.Tensor:
    """Rows that reuse keep `full` (their input); the others take the computed `part` (in row order)."""
    out = full.clone()
    out[~reuse_rows] = part.to(full.dtype)
    return out


def _take(values, index: torch.Tensor, rows: int):
    """The rows `index` of every tensor argument whose dim 0 is the block's `rows` (others pass unchanged)."""

    def pick(v):
        return v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v

    if isinstance(values, dict):
        return {k: pick(v) for k, v in values.items()}
    return tuple(pick(v) for v in values)


class FBCacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(0.15, ge=0, description="relative L1 change under which blocks are reused",
                             json_schema_extra={"request_field": "cache_threshold"})  # fmt: skip
    max_reuse: int = Field(4, ge=1, description="consecutive reuses before a full step",
                           json_schema_extra={"request_field": "cache_max_reuse"})  # fmt: skip
    guard_steps: int = Field(2, ge=0, description="first/last N steps always compute",
                             json_schema_extra={"request_field": "cache_guard_steps"})  # fmt: skip


class FirstBlockCacheMethod(CacheMethod):
    """`fbcache`: the adaptive first-block cache (this module's BlockCache); its options live in CacheConfig."""

    name = "fbcache"
    summary = "per sample, skip the blocks after the first when its residual barely moved"
    Options = FBCacheOptions

    def install(self, cache) -> None:
        cache.blocks = BlockCache(cache)

    def reset(self, cache) -> None:
        cache.blocks.reset()

    def calls_saved(self, cache, totals: dict) -> float:
        return totals["blocks_skipped"] / len(cache.layout.blocks)  # a skipped block = 1/blocks of a model call


register_cache_method(FirstBlockCacheMethod())
