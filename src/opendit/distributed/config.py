"""ParallelConfig: the degrees of every parallel strategy on one device mesh, validated with actionable messages.

Mesh layout, outermost to innermost: pipefusion, dp, cfg, ring, ulysses, tp. PipeFusion stages are outermost: their
small per-patch messages are what slow links (PCIe, between nodes) carry best. Tensor parallelism is innermost
because it all-reduces the whole activation twice per block, the heaviest traffic of all; Ulysses (or FastSeq) comes
next for its all-to-alls; the innermost ranks share the fastest links (same node, NVLink).
Rank r therefore has coordinates r = ((((pf_i * dp + dp_i) * cfg + cfg_i) * ring + ring_i) * ulysses + ulysses_i) * tp
+ tp_i.
"""

import itertools
from dataclasses import asdict, dataclass

from opendit.errors import OpenDiTError

MESH_DIMS = ("pipefusion", "dp", "cfg", "ring", "ulysses", "tp")


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1  # groups that each generate a different subset of the images
    cfg: int = 1  # 2: conditional and unconditional halves of the CFG batch on different groups
    ulysses: int = 1  # head-parallel sequence degree (Ulysses all-to-all, or FastSeq), innermost
    ring: int = 1  # ring-attention sequence degree
    tp: int = 1  # tensor parallel: heads, MLP and adaLN weights split over the innermost ranks (parallel/tensor.py)
    pipefusion: int = 1  # PipeFusion stages: the blocks split over N ranks, patches pipelined (parallel/pipefusion.py)
    patches: int = 0  # PipeFusion patches M >= stages (0: as many as stages)
    warmup_steps: int = 1  # PipeFusion: the first K steps run synchronously (exact)
    sp_impl: str = "auto"  # a registered strategy (parallel/registry.py); auto: the registry's choice for the degrees
    shard_weights: bool = False  # shard parameters over the sequence-parallel group, gather per block
    comm_dtype: str | None = None  # send activations in bf16/fp16 while computing in the model dtype
    token_shares: tuple[float, ...] | None = None  # relative speed per sequence rank (load balancing); None: even
    balance_tokens: bool = False  # re-split tokens from the measured per-rank busy time of the first steps

    @property
    def world_size(self) -> int:
        return self.pipefusion * self.dp * self.cfg * self.ulysses * self.ring * self.tp

    @property
    def patch_count(self) -> int:
        """PipeFusion's patches (M; the default: one per stage)."""
        return self.patches or self.pipefusion

    @property
    def sp_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def impl(self) -> str:
        """The sequence-parallel kernel this config runs ("none" without sequence parallelism)."""
        if self.sp_impl != "auto":
            return self.sp_impl
        from opendit.parallel.registry import auto_strategy

        return auto_strategy(self.ulysses, self.ring)

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in MESH_DIMS if getattr(self, name) > 1]
        text = " x ".join(parts) or "single device"
        if self.sp_degree > 1:
            text += f" (sequence parallel: {self.impl})"
        if self.pipefusion > 1:
            text += f" ({self.patch_count} patches, {self.warmup_steps} synchronous steps)"
        if self.shard_weights:
            text += ", sharded weights"
        if self.comm_dtype:
            text += f", comm in {self.comm_dtype}"
        if self.balance_tokens:
            text += ", tokens balanced by measured speed"
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(
        self, world_size: int, num_heads: int, num_tokens: int, num_images: int, guided: bool, frames: int = 1
    ) -> list[str]:
        """Raise OpenDiTError for impossible requests (naming valid alternatives); return notes on exact fallbacks.
        `frames`: a video model's frame count (num_tokens is then the positions per frame)."""
        for name in MESH_DIMS:
            if getattr(self, name) < 1:
                raise OpenDiTError(f"{name} degree must be >= 1, got {getattr(self, name)}")
        if self.world_size != world_size:
            raise OpenDiTError(
                f"parallel degrees pipefusion={self.pipefusion} x dp={self.dp} x cfg={self.cfg} x ring={self.ring} x "
                f"ulysses={self.ulysses} x tp={self.tp} = "
                f"{self.world_size} must equal the number of processes {world_size}; valid plans for {world_size}: "
                + "; ".join(p.describe() for p in suggest_plans(world_size, num_heads, guided)[:4])
            )
        if self.cfg not in (1, 2):
            raise OpenDiTError(f"cfg degree must be 1 or 2 (the two halves of guidance), got {self.cfg}")
        if self.cfg == 2 and not guided:
            raise OpenDiTError("cfg parallel needs guidance: pass --cfg-scale > 1, or drop --cfg-parallel")
        if self.dp > num_images:
            raise OpenDiTError(f"dp degree {self.dp} exceeds the {num_images} images requested; use --dp {num_images}")
        if self.sp_degree > num_tokens:
            raise OpenDiTError(
                f"sequence-parallel degree {self.sp_degree} exceeds the {num_tokens} tokens; use a larger image or "
                f"at most {num_tokens} sequence ranks"
            )
        self._check_pipefusion(num_tokens)
        notes = self._check_tensor(num_heads)
        num_heads = num_heads // self.tp  # what each tensor-parallel rank's attention holds (at least)
        notes += self._check_strategy(num_heads, num_tokens, frames)
        if self.balance_tokens and self.sp_degree == 1:
            raise OpenDiTError("--balance-tokens re-splits the sequence; add --ulysses or --ring (or drop it)")
        if self.token_shares is not None and len(self.token_shares) != self.sp_degree:
            raise OpenDiTError(f"token shares need one entry per sequence rank ({self.sp_degree})")
        if self.sp_degree > 1 and not self._strategy_splits_heads():
            return notes  # e.g. DSP: the degree splits frames and positions, every rank keeps every head
        if self.ulysses > num_heads:
            inner = max(d for d in range(1, num_heads + 1) if num_heads % d == 0 and self.ulysses % d == 0)
            raise OpenDiTError(
                f"ulysses degree {self.ulysses} exceeds num_heads {num_heads}"
                + (f" (heads per tensor-parallel rank at --tp {self.tp})" if self.tp > 1 else "")
                + f"; try --ulysses {inner} "
                f"--ring {self.ring * self.ulysses // inner} (or --ring {self.sp_degree})"
            )
        if self.ulysses > 1 and num_heads % self.ulysses:
            from opendit.parallel.sequence import head_sizes

            notes.append(
                f"ulysses degree {self.ulysses} does not divide {num_heads} heads: heads are split unevenly "
                f"({', '.join(map(str, head_sizes(num_heads, self.ulysses)))}), exact but less balanced"
            )
        return notes

    def _check_pipefusion(self, num_tokens: int) -> None:
        """PipeFusion runs on its own mesh dimension alone for now; M >= N patches, each at least one token."""
        if self.pipefusion == 1:
            if self.patches or self.warmup_steps != 1:
                raise OpenDiTError("--patches and --warmup-steps are PipeFusion's; add --pipefusion N (or drop them)")
            return
        others = {d: getattr(self, d) for d in MESH_DIMS if d != "pipefusion" and getattr(self, d) > 1}
        if others or self.shard_weights or self.comm_dtype or self.balance_tokens:
            given = ", ".join(f"{d}={n}" for d, n in others.items()) or "sharding, comm dtype or token balancing"
            raise OpenDiTError(
                f"--pipefusion {self.pipefusion} does not combine with {given} yet; run PipeFusion alone "
                f"(--nproc {self.pipefusion} --pipefusion {self.pipefusion})"
            )
        if self.patches and self.patches < self.pipefusion:
            raise OpenDiTError(
                f"--patches {self.patches} must be at least --pipefusion {self.pipefusion} (every stage needs a patch "
                f"in flight); try --patches {self.pipefusion} or {2 * self.pipefusion}"
            )
        if self.patch_count > num_tokens:
            raise OpenDiTError(
                f"--patches {self.patch_count} exceeds the {num_tokens} tokens; use at most {num_tokens}"
            )
        if self.warmup_steps < 0:
            raise OpenDiTError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")

    def _check_tensor(self, num_heads: int) -> list[str]:
        """Tensor parallelism splits heads: at most one rank per head; uneven splits are exact (a note says so)."""
        if self.tp == 1:
            return []
        if self.tp > num_heads:
            valid = [d for d in range(2, num_heads + 1) if num_heads % d == 0]
            raise OpenDiTError(
                f"tp degree {self.tp} exceeds num_heads {num_heads}: tensor parallelism splits attention by heads; "
                f"try --tp {' or --tp '.join(map(str, valid[:4])) if valid else 1}"
            )
        if self.shard_weights:
            raise OpenDiTError(
                "--tp already splits the block weights over its ranks; --shard-weights with --tp is not supported, "
                "drop one of the two"
            )
        if num_heads % self.tp:
            from opendit.parallel.sequence import head_sizes

            sizes = ", ".join(map(str, head_sizes(num_heads, self.tp)))
            return [f"tp degree {self.tp} does not divide {num_heads} heads: heads split {sizes} (exact, less even)"]
        return []

    def _strategy_splits_heads(self) -> bool:
        from opendit.parallel.registry import get_strategy

        return self.impl == "none" or get_strategy(self.impl).splits_heads

    def _check_strategy(self, num_heads: int, num_tokens: int, frames: int = 1) -> list[str]:
        """The sequence-parallel strategy's own rules (parallel/registry.py): it must run on these degrees."""
        from opendit.models.spec import ModelDims
        from opendit.parallel.registry import get_strategy, strategies_for

        if self.sp_impl == "auto":
            return []
        strategy = get_strategy(self.sp_impl)  # raises for an unknown name, listing the registered ones
        notes = strategy.check(self, ModelDims(1, num_heads, num_heads, num_tokens, sequences=frames))
        if self.sp_degree > 1 and not strategy.accepts(self.ulysses, self.ring):
            fits = ", ".join(s.name for s in strategies_for(self.ulysses, self.ring)) or "none"
            raise OpenDiTError(
                f"sp-impl {strategy.name} runs on {' x '.join(strategy.uses)} only, but the plan has "
                f"ulysses={self.ulysses}, ring={self.ring}; strategies for this layout: {fits}"
            )
        return notes


def suggest_plans(world_size: int, num_heads: int, guided: bool) -> list[ParallelConfig]:
    """Valid plans for a world size, most useful first: cfg parallel, then ulysses dividing the heads, then ring."""
    plans = []
    for cfg, ulysses in itertools.product((2, 1) if guided else (1,), range(world_size, 0, -1)):
        rest, rem = divmod(world_size, cfg * ulysses)
        if rem or ulysses > num_heads:
            continue
        plans.append(ParallelConfig(cfg=cfg, ulysses=ulysses, ring=rest))
    plans.sort(key=lambda p: (p.ulysses > 1 and num_heads % p.ulysses != 0, -p.cfg, p.ring))
    return plans


def default_plan(world_size: int, num_heads: int, guided: bool) -> tuple[ParallelConfig, str]:
    """The plan used when the user gives only --nproc: the first of suggest_plans, with the reason."""
    if world_size == 1:
        return ParallelConfig(), "one process"
    plan = suggest_plans(world_size, num_heads, guided)[0]
    why = "cfg parallel halves the batch with one gather per step" if plan.cfg == 2 else ""
    if plan.ring > 1 and plan.ulysses == 1:
        why = f"ring: ulysses degree {world_size} does not divide {num_heads} heads"
    return plan, why or "ulysses: fewest bytes per step among sequence-parallel kernels"
