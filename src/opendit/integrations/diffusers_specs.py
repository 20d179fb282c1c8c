"""One declared plan per diffusers transformer class: where tokens are split and gathered, which attention modules
run over the sequence group (and over which token streams), and which root arguments carry no batch dim.

Split points (module path -> argument or output -> Split): "" is the model's own forward. Attention entries map a
module path pattern (`*` = one path component) to (processor kind, streams); modules matching none keep diffusers'
processor, which is right for cross-attention to text (local queries, every text token). `cfg_batched`: the class's
pipelines run [uncond; cond] in one call (DiT: [cond; uncond]), so --cfg-parallel can split that batch; Flux and Wan
pipelines call the transformer once per branch, so it is refused for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opendit.integrations.diffusers_parallel import Split
from opendit.models.spec import TensorSplit


@dataclass(frozen=True)
class DiffusersSpec:
    name: str
    class_name: str
    inputs: dict  # module path -> {argument name or position: Split}: narrowed before the module runs
    outputs: dict  # module path -> {output index (None: the output itself): Split}: narrowed after it runs
    gather: dict  # module path -> (dim, stream): output all-gathered over the sequence group
    attention: dict  # module path pattern -> (processor kind, streams)
    cfg_batched: bool = True
    not_batched: tuple[str, ...] = ()  # root arguments without a batch dim (Flux's img_ids / txt_ids)
    heads_attr: str = "num_attention_heads"
    notes: dict = field(default_factory=dict)
    tensor: TensorSplit | None = None  # where --tp splits the class (parallel/tensor.py); None: not declared

    def num_heads(self, module) -> int:
        return int(module.config[self.heads_attr])


IMAGE, TEXT = ("image",), ("text",)

SPECS = {
    "DiTTransformer2DModel": DiffusersSpec(
        name="diffusers DiT",
        class_name="DiTTransformer2DModel",
        inputs={},
        outputs={"pos_embed": {None: Split(1)}},  # patches + absolute positions (B, N, C): split there
        gather={"proj_out_2": (1, "image")},  # before unpatchify, which reads the grid from the token count
        attention={"transformer_blocks.*.attn1": ("self", IMAGE)},
        tensor=TensorSplit(  # each block's own adaLN-Zero (norm1.linear: 6 x C) split per chunk and gathered
            attention=("transformer_blocks.*.attn1",),
            attention_kind="separate_qkv",
            column=("transformer_blocks.*.ff.net.0.proj",),
            row=("transformer_blocks.*.ff.net.2",),
            gathered=(("transformer_blocks.*.norm1.linear", 6),),
        ),
    ),
    "PixArtTransformer2DModel": DiffusersSpec(
        name="diffusers PixArt",
        class_name="PixArtTransformer2DModel",
        inputs={},
        outputs={"pos_embed": {None: Split(1)}},
        gather={"proj_out": (1, "image")},
        attention={"transformer_blocks.*.attn1": ("self", IMAGE)},  # attn2: cross-attention to the text, local
        tensor=TensorSplit(  # adaLN-single: the per-block scale_shift_table (6, C) is tiny and stays whole
            attention=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2"),
            attention_kind="separate_qkv",
            column=("transformer_blocks.*.ff.net.0.proj",),
            row=("transformer_blocks.*.ff.net.2",),
        ),
    ),
    "SD3Transformer2DModel": DiffusersSpec(
        name="diffusers SD3 (MMDiT)",
        class_name="SD3Transformer2DModel",
        inputs={},
        # image patches (positions inside pos_embed) and the projected text tokens are both split
        outputs={"pos_embed": {None: Split(1)}, "context_embedder": {None: Split(1, "text")}},
        gather={"proj_out": (1, "image")},
        attention={
            "transformer_blocks.*.attn": ("joint", ("image", "text")),
            "transformer_blocks.*.attn2": ("self", IMAGE),  # SD3.5's dual attention: image tokens only
        },
    ),
    "FluxTransformer2DModel": DiffusersSpec(
        name="diffusers Flux",
        class_name="FluxTransformer2DModel",
        # split at the model's inputs, so the RoPE positions computed from the ids match the local tokens
        inputs={
            "": {
                "hidden_states": Split(1, "image", 3),
                "encoder_hidden_states": Split(1, "text", 3),
                # (S, 3), or the deprecated (B, S, 3) that Flux reduces to (S, 3): the sequence dim is -2 in both
                "img_ids": Split(-2, "image"),
                "txt_ids": Split(-2, "text"),
            }
        },
        outputs={},
        gather={"proj_out": (1, "image")},
        attention={
            "transformer_blocks.*.attn": ("flux", ("text", "image")),
            "single_transformer_blocks.*.attn": ("flux", ("text", "image")),
        },
        cfg_batched=False,
        not_batched=("img_ids", "txt_ids"),
    ),
    "WanTransformer3DModel": DiffusersSpec(
        name="diffusers Wan",
        class_name="WanTransformer3DModel",
        inputs={
            "": {"timestep": Split(1, "image", 2)},  # Wan 2.2 TI2V: one timestep per token (B, S)
            "blocks.0": {"hidden_states": Split(1, "image", 3), 0: Split(1, "image", 3)},
        },
        outputs={"rope": {0: Split(1, "image", 4), 1: Split(1, "image", 4)}},  # (cos, sin), each (1, S, 1, D)
        gather={"proj_out": (1, "image")},
        attention={"blocks.*.attn1": ("wan_self", IMAGE)},  # attn2: cross-attention to the text, local
        cfg_batched=False,
    ),
}


def spec_for_module(module) -> DiffusersSpec | None:
    return SPECS.get(type(module).__name__)
