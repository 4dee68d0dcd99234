"""SegFormer (Xie et al., NeurIPS 2021): the Mix Transformer (MiT) encoder and the all-MLP decoder, as
CIRKD builds it for its transformer rows (`segformer_mit_b0` student, `segformer_mit_b4` teacher).

What CIRKD trains, read from winycg/CIRKD @ 2d8ad0f703676da698abdf077cc5a67181d1c635 `models/segformer.py`
(the commit of the README that reports the SegFormer rows; the network is unchanged at dab64db):

- Encoder: four stages. Each starts with an overlapping patch embedding (a conv, kernel 7 stride 4 for
  stage 1, kernel 3 stride 2 after it, padding kernel // 2, then LayerNorm with eps 1e-5) and runs
  `depths[i]` blocks of pre-norm efficient self-attention + Mix-FFN, then a LayerNorm (eps 1e-6).
  - Attention: q from every token, k and v from the tokens reduced by a `sr_ratio` x `sr_ratio` conv of
    stride `sr_ratio` (8, 4, 2, 1) followed by a LayerNorm (eps 1e-5); heads 1, 2, 5, 8; scale
    head_dim^-0.5; q/kv biases on.
  - Mix-FFN: Linear(C, 4C), a 3x3 depth-wise conv (with bias) over the token grid, GELU, Linear(4C, C).
  - Block norms eps 1e-6; stochastic depth rising linearly from 0 to 0.1 over all blocks.
  - MiT-B0: widths 32, 64, 160, 256, depths 2, 2, 2, 2. MiT-B4: widths 64, 128, 320, 512, depths
    3, 8, 27, 3.
- Decoder (all-MLP): one Linear per stage to `decoder_dim` (256 for B0, 768 for B4), each map resized
  bilinearly (align_corners=False) to stage 1's size (stride 4), concatenated deepest first [c4, c3, c2,
  c1], fused by a 1x1 conv **with bias** + BatchNorm + ReLU, then a 1x1 classifier. CIRKD's dropout before
  the classifier has p = 0 (its `drop_rate=0.0`), so none is built. `decoder_feature` is the fused map
  (B x decoder_dim x H/4 x W/4), the `_c` CIRKD's SegFormer returns beside its logits and its losses read.
- No auxiliary head (`aux` is None; `model.aux=true` is refused).

That is 3,719,283 parameters for B0 and 64,008,403 for B4 at 19 classes, CIRKD's counts. Two places
where the original SegFormer (NVlabs/SegFormer, mmseg) differs and CIRKD is followed: the fuse conv has a
bias there none (mmseg's ConvModule before a norm), and its decode head has dropout 0.1.

Why our own code: timm has no MiT; Hugging Face `transformers`' Segformer is the same architecture
but is not a dependency of the suite (a large package for one model), and its decode head's fuse conv
has no bias, so its count is 256 (B0) / 768 (B4) below CIRKD's. The attention is written with explicit
matmuls (not `scaled_dot_product_attention`, which fvcore cannot count) so that `sdesbench profile`
includes them (docs/models.md).

Weights (`model.weights`, see `load_segformer_weights`): the encoder's parameters carry the names of
NVlabs' `mix_transformer.py` (`patch_embed1.proj`, `block1.0.attn.q`, `block1.0.mlp.dwconv.dwconv`,
`norm1`, ...) and the decoder's those of CIRKD's head (`linear_c1.proj`, `linear_fuse.0/1`,
`linear_pred`), so NVlabs' ImageNet files `mit_b*.pth` and CIRKD's trained SegFormer checkpoints load by
name; mmsegmentation's converted MiT files (`layers.i.j...`, its `mit2mmseg` layout) are converted back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from sdesbench.errors import ConfigError
from sdesbench.models.base import MODELS, SegmentationModel
from sdesbench.models.cirkd_weights import cirkd_weights_file
from sdesbench.models.deeplabv3 import read_state

# LayerNorm epsilons of CIRKD's (and NVlabs') MiT: the block and stage norms are built with eps 1e-6, the
# patch-embedding norm and the attention's reduction norm with nn.LayerNorm's default
BLOCK_EPS = 1e-6
EMBED_EPS = 1e-5


@dataclass(frozen=True)
class MiTConfig:
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    decoder_dim: int
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    drop_path: float = 0.1


MIT = {
    "b0": MiTConfig(widths=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b4": MiTConfig(widths=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
}


def init_segformer_(module: nn.Module) -> None:
    """SegFormer's initialisation: Linear weights truncated normal (std 0.02) and zero biases; convs normal
    with std sqrt(2 / fan_out), fan_out per group; LayerNorm and BatchNorm at identity."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B x (h*w) x C tokens as a B x C x h x w map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv (padding kernel // 2), flattened to tokens, LayerNorm."""

    def __init__(self, in_channels: int, width: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(width, eps=EMBED_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from the token grid shrunk `sr_ratio` times
    per side (a conv of kernel = stride = sr_ratio, then LayerNorm), so stage 1 attends over N/64 keys."""

    def __init__(self, width: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(width, width, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(width, eps=EMBED_EPS)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)  # B x heads x N x d
        source = x
        if self.sr_ratio > 1:
            source = self.norm(self.sr(tokens_to_map(x, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(source).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        # explicit matmuls rather than F.scaled_dot_product_attention: fvcore counts aten::matmul
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class DepthwiseConv(nn.Module):
    """The 3x3 depth-wise conv of Mix-FFN, applied to tokens laid out on their h x w grid."""

    def __init__(self, width: int):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.dwconv(tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear expansion, 3x3 depth-wise conv (the positional information MiT has instead of embeddings),
    GELU, Linear projection back."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + ffn(norm2(x)), each branch under
    stochastic depth."""

    def __init__(self, width: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=BLOCK_EPS)
        self.attn = EfficientAttention(width, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(width, eps=BLOCK_EPS)
        self.mlp = MixFFN(width, width * mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """The MiT encoder: four stages at strides 4, 8, 16, 32, each returned as a B x C x h x w map.
    Submodules are named `patch_embed{i}`, `block{i}`, `norm{i}` (i = 1..4), NVlabs' state-dict layout."""

    def __init__(self, cfg: MiTConfig, in_channels: int = 3):
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths)).tolist()
        start = 0
        for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths), start=1):
            kernel, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", PatchEmbed(in_channels, width, kernel, stride))
            setattr(self, f"block{i}", nn.ModuleList(
                MiTBlock(width, cfg.heads[i - 1], cfg.sr_ratios[i - 1], cfg.mlp_ratio, rates[start + j])
                for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(width, eps=BLOCK_EPS))
            in_channels, start = width, start + depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = tokens_to_map(getattr(self, f"norm{i}")(x), h, w).contiguous()
            stages.append(x)
        return stages


class StageProjection(nn.Module):
    """One stage's map projected per pixel to the decoder width (a Linear over channels)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return tokens_to_map(self.proj(x.flatten(2).transpose(1, 2)), h, w)


class AllMLPDecoder(nn.Module):
    """Each stage projected to `dim`, resized to stage 1's grid, concatenated [c4, c3, c2, c1], fused by a
    1x1 conv (with bias) + BN + ReLU (`decoder_feature`), classified by a 1x1 conv."""

    def __init__(self, stage_channels: list[int], dim: int, num_classes: int):
        super().__init__()
        for i, channels in enumerate(stage_channels, start=1):
            setattr(self, f"linear_c{i}", StageProjection(channels, dim))
        self.linear_fuse = nn.Sequential(nn.Conv2d(4 * dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.linear_pred = nn.Conv2d(dim, num_classes, 1)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        size = stages[0].shape[-2:]
        maps = []
        for i in (4, 3, 2, 1):
            m = getattr(self, f"linear_c{i}")(stages[i - 1])
            maps.append(m if i == 1 else F.interpolate(m, size=size, mode="bilinear", align_corners=False))
        feat = self.linear_fuse(torch.cat(maps, dim=1))
        return {"decoder_feature": feat, "logits": self.linear_pred(feat)}


class SegFormer(SegmentationModel):
    """MiT encoder (`backbone`) + all-MLP decoder (`decoder`); logits at stride 4, resized to the input."""

    def __init__(self, variant: str, num_classes: int, pretrained: bool = False, weights: str | None = None,
                 aux: bool = False):
        super().__init__()
        if aux:
            raise ConfigError("model.aux: SegFormer has no auxiliary head (CIRKD's models/segformer.py builds none)")
        if pretrained and not weights:
            raise ConfigError(f"model.pretrained: SegFormer's ImageNet weights are not in timm; pass --set "
                              f"model.weights=/path/to/mit_{variant}.pth (NVlabs' release) or a CIRKD SegFormer "
                              f"checkpoint")
        cfg = MIT[variant]
        self.variant = variant
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.stage_channels = list(cfg.widths)
        self.stage_strides = [4, 8, 16, 32]
        self.decoder_channels = cfg.decoder_dim
        self.backbone = MixTransformer(cfg)
        self.decoder = self.build_decoder(num_classes)
        self.backbone.apply(init_segformer_)
        self.aux_head = None
        if pretrained:
            load_segformer_weights(self, weights)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def build_decoder(self, num_classes: int) -> nn.Module:
        decoder = AllMLPDecoder(self.stage_channels, self.decoder_channels, num_classes)
        decoder.apply(init_segformer_)
        return decoder


# --- weights files --------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("patch_embed", "block", "norm")
DECODER_PREFIXES = ("linear_c", "linear_fuse", "linear_pred")


def mmseg_to_nvlabs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmsegmentation's MiT names (`layers.{s}.0` patch embedding with `projection`, `layers.{s}.1.{j}`
    blocks with `attn.attn.in_proj_*` = [q; kv], `attn.attn.out_proj`, `ffn.layers.{0,1,4}` as 1x1 / 3x3
    convs, `layers.{s}.2` the stage norm) renamed to NVlabs' (`patch_embed{s+1}`, `block{s+1}.{j}`, ...)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers" or len(parts) < 4:
            continue
        stage, part = int(parts[1]) + 1, parts[2]
        rest = ".".join(parts[3:])
        if part == "0":
            out[f"patch_embed{stage}.{rest.replace('projection.', 'proj.')}"] = value
        elif part == "2":
            out[f"norm{stage}.{rest}"] = value
        elif part == "1":
            block, inner = parts[3], ".".join(parts[4:])
            name = f"block{stage}.{block}."
            if inner.startswith("attn.attn.in_proj_"):
                kind = inner.rsplit("_", 1)[1]  # weight | bias
                width = value.shape[0] // 3
                out[name + f"attn.q.{kind}"], out[name + f"attn.kv.{kind}"] = value[:width], value[width:]
            elif inner.startswith("attn.attn.out_proj."):
                out[name + "attn.proj." + inner.rsplit(".", 1)[1]] = value
            elif inner.startswith("ffn.layers."):
                layer, kind = inner.split(".")[2], inner.split(".")[3]
                target = {"0": "mlp.fc1", "1": "mlp.dwconv.dwconv", "4": "mlp.fc2"}[layer]
                out[name + f"{target}.{kind}"] = value.flatten(1) if layer != "1" and kind == "weight" else value
            else:  # norm1, norm2, attn.sr, attn.norm keep their names
                out[name + inner] = value
    return out


def load_segformer_weights(model: SegFormer, weights: str) -> None:
    """Load `weights` into `model`, recognising the file by its key layout:

    - NVlabs' ImageNet MiT (`mit_b*.pth`: encoder names as ours, plus the classification `head.*`, ignored):
      the encoder;
    - mmsegmentation's converted MiT (`layers.*`): the encoder, renamed back;
    - CIRKD's SegFormer checkpoint (`segformer_MiT_B*_citys_best_model.pth`: encoder and decoder names as
      ours, a `module.` prefix of DDP stripped): the whole network; its classifier only when the class
      counts agree (else it stays initialised, as when fine-tuning on another dataset).
    `weights` may also be a folder holding NVlabs' file under its name (`mit_b0.pth`, `mit_b4.pth`), as CIRKD's
    tables pass one folder of ImageNet files for every network. Every encoder tensor must be found with its
    shape, else one line says how many were not.
    """
    file = Path(cirkd_weights_file(weights, f"mit_{model.variant}.pth"))
    state = read_state(file)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("layers.") for k in state):
        state = mmseg_to_nvlabs(state)
    targets = {"backbone": model.backbone}
    if any(k.startswith(DECODER_PREFIXES) for k in state):
        targets["decoder"] = model.decoder
    for prefix, module in targets.items():
        own = module.state_dict()
        found = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        missing = [k for k in own if k not in found]
        if prefix == "decoder":  # another class count: the classifier alone may differ
            missing = [k for k in missing if not k.startswith("linear_pred.")]
        if missing:
            raise ConfigError(f"model.weights: {file} does not fit the MiT-{model.variant.upper()} {prefix} "
                              f"({len(missing)} of {len(own)} tensors missing or of another shape, e.g. {missing[0]}; "
                              f"expected NVlabs' mit_{model.variant}.pth or a CIRKD SegFormer MiT-"
                              f"{model.variant.upper()} checkpoint)")
        module.load_state_dict(found, strict=False)


@MODELS.register("segformer_mit_b0")
def segformer_mit_b0(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    """CIRKD's SegFormer MiT-B0 student (3.72 M parameters at 19 classes)."""
    return SegFormer("b0", num_classes, pretrained, weights, aux)


@MODELS.register("segformer_mit_b4")
def segformer_mit_b4(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    """CIRKD's SegFormer MiT-B4 teacher (64.0 M parameters at 19 classes)."""
    return SegFormer("b4", num_classes, pretrained, weights, aux)
