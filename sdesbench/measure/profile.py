"""Params and FLOPs of the benchmark's models, next to the figures a paper reports for them.

Two reference sets (`REFERENCES`), each compared in the counting convention its figures were made in:

- `sdes` (default): the SDES paper, Table 2 (Cityscapes, 19 classes, FLOPs at 512x1024) and Table 3 /
  "Results on CamVid" (11 classes, Params only). Its figures are fvcore counts: `FlopCountAnalysis`
  (one multiply-add = one FLOP; BatchNorm in eval mode counts one FLOP per element and two with its
  affine part; bilinear upsampling and adaptive pooling count; ReLU, max-pool, additions count
  nothing), without auxiliary heads. The "Ens-T" row is the ResNet-18 student plus the N = 4 light
  expert decoders of Table 2 (`sdesbench.models.experts.LightExpertDecoder`).
- `cirkd`: CIRKD's Table 1 (Yang et al., CVPR 2022; Cityscapes, 19 classes): its teacher and three
  students. Those figures are what CIRKD's training scripts log (winycg/CIRKD @ 7e0d21f,
  `train_baseline.py`: `cal_param_size(model)` and `cal_multi_adds(model, (1, 3, 1024, 2048))` of
  `utils/flops.py`): at 1024x2048, with the aux head of the ResNet models counted (its scripts build
  every ResNet model with `aux=True`), FLOPs = multiply-adds of the Conv2d and Linear layers only, with
  the output size of a conv computed without its dilation. `count_cirkd_gflops` is that count; fvcore's
  count of the same network is printed beside it.

Every count: the model in eval mode, batch 1. Params = every parameter of the model (trainable or not).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from sdesbench.config import ModelConfig
from sdesbench.errors import ConfigError
from sdesbench.models import MODELS, build_model, count_params
from sdesbench.models.experts import LightExpertDecoder

ENS_T = "ens_t_resnet18"
ENS_T_EXPERTS = 4


@dataclass(frozen=True)
class PaperFigures:
    model: str
    num_classes: int
    input_size: tuple[int, int]  # H, W at which the paper's FLOPs were measured
    params_m: float | None
    gflops: float | None
    aux: bool = False  # the paper's figures include the model's auxiliary head


PAPER_ROWS: list[PaperFigures] = [
    PaperFigures("deeplabv3_resnet50", 19, (512, 1024), 39.64, 327.97),
    PaperFigures("deeplabv3_resnet18", 19, (512, 1024), 15.90, 134.08),
    PaperFigures(ENS_T, 19, (512, 1024), 15.94, 134.34),
    PaperFigures("erfnet", 19, (512, 1024), 2.07, 26.86),
    PaperFigures("esnet", 19, (512, 1024), 1.66, 24.35),
    PaperFigures("enet", 19, (512, 1024), 0.36, 4.35),
    PaperFigures("deeplabv3_mobilenetv2", 11, (512, 512), 12.65, None),
    PaperFigures("deeplabv3_efficientnet_b0", 11, (512, 512), 7.31, None),
]

# CIRKD Table 1 (Params M, FLOPs G at 1024x2048; the aux head of the ResNet models included). The
# paper prints one decimal; CIRKD's own code at 7e0d21f gives 61.1189 M / 2371.66 G, 13.6080 M /
# 572.01 G, 3.2332 M / 128.92 G and 12.9193 M / 507.35 G for these four (docs/models.md). The rows are
# CIRKD's networks (`*_cirkd`, `pspnet_resnet18`), with the SDES-shaped DeepLabV3s beside them to show
# how far those are from CIRKD's.
CIRKD_ROWS: list[PaperFigures] = [
    PaperFigures("deeplabv3_resnet101_cirkd", 19, (1024, 2048), 61.1, 2371.7, aux=True),
    PaperFigures("deeplabv3_resnet18_cirkd", 19, (1024, 2048), 13.6, 572.0, aux=True),
    PaperFigures("deeplabv3_mobilenetv2_cirkd", 19, (1024, 2048), 3.2, 128.9),
    PaperFigures("pspnet_resnet18", 19, (1024, 2048), 12.9, 507.4, aux=True),
    PaperFigures("deeplabv3_resnet101", 19, (1024, 2048), 61.1, 2371.7, aux=True),
    PaperFigures("deeplabv3_resnet18", 19, (1024, 2048), 13.6, 572.0, aux=True),
    PaperFigures("deeplabv3_mobilenetv2", 19, (1024, 2048), 3.2, 128.9),
]


@dataclass(frozen=True)
class ReferenceSet:
    rows: list[PaperFigures]
    counter: str  # "fvcore" or "cirkd": the convention the paper's FLOPs were counted in
    source: str


REFERENCES = {
    "sdes": ReferenceSet(PAPER_ROWS, "fvcore", "SDES (AAAI 2023) Tables 2 and 3"),
    "cirkd": ReferenceSet(CIRKD_ROWS, "cirkd", "CIRKD (CVPR 2022) Table 1"),
}


class LogitsOnly(nn.Module):
    """Traces a SegmentationModel through its logits, and its aux logits when it has an aux head
    (fvcore cannot trace None / nested outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out["logits"] if out["aux"] is None else (out["logits"], out["aux"])


class EnsembleTeacher(nn.Module):
    """The SDES self-ensemble teacher as profiled in Table 2: the student (encoder + its decoder) and
    the expert decoders on the encoder's stages (routing pixels between them costs no FLOPs)."""

    def __init__(self, student: nn.Module, experts: nn.ModuleList):
        super().__init__()
        self.student = student
        self.experts = experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.student(x)
        return (out["logits"], *(e(out["stages"])["logits"] for e in self.experts))


def build_profiled(model: str, num_classes: int, aux: bool = False) -> nn.Module:
    """The network a profile row measures (with its aux head when `aux`), in eval mode, returning
    tensors only."""
    if model == ENS_T:
        student = build_model("deeplabv3_resnet18", num_classes)
        experts = nn.ModuleList(LightExpertDecoder(student.stage_channels[-1], num_classes)
                                for _ in range(ENS_T_EXPERTS))
        net: nn.Module = EnsembleTeacher(student, experts)
    else:
        net = LogitsOnly(build_model(ModelConfig(name=model, aux=aux), num_classes))
    return net.eval()


def count_gflops(net: nn.Module, input_size: tuple[int, int]) -> float:
    """fvcore FLOPs (multiply-adds) of one forward pass at batch 1, in units of 1e9."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # skipped-op notices are expected (ReLU, add, ...)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation / tracer notices from fvcore's tracing
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(net, torch.zeros(1, 3, *input_size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return analysis.total() / 1e9


def count_cirkd_gflops(net: nn.Module, input_size: tuple[int, int]) -> float:
    """Multiply-adds of one forward pass at batch 1 (in units of 1e9) counted as CIRKD counts them
    (winycg/CIRKD `utils/flops.py`, `measure_layer`): per call of a Conv2d, Cin x Cout x kh x kw x
    out_h x out_w / groups, with out = (in + 2 padding - kernel) // stride + 1, i.e. *without* the
    dilation (a dilated conv is counted as if its output were larger by 2 x (dilation - 1) per side);
    per call of a Linear, its weight's size; nothing else (BatchNorm, pooling, upsampling are free).
    Only shapes matter, so the network runs on the meta device (no memory, no arithmetic); `net` is
    moved there."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
            out_h = (inputs[0].shape[-2] + 2 * ph - kh) // sh + 1
            out_w = (inputs[0].shape[-1] + 2 * pw - kw) // sw + 1
            total += module.in_channels * module.out_channels * kh * kw * out_h * out_w // module.groups
        else:
            total += module.weight.numel()

    net = net.to("meta")
    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, *input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total / 1e9


def rel_diff(measured: float | None, paper: float | None) -> float | None:
    if measured is None or paper is None:
        return None
    return (measured - paper) / paper


def parse_size(text: str, option: str = "--input", multiple: int = 8) -> tuple[int, int]:
    """'HxW' -> (H, W), both at least 8 and multiples of `multiple` (profiling: 8, the output stride)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{option}: expected HxW such as 512x1024, got {text!r}") from None
    if h < 8 or w < 8 or h % multiple or w % multiple:
        raise ConfigError(f"{option}: height and width must be multiples of {multiple} and at least 8, got {text!r}")
    return h, w


def profile_rows(model: str | None = None, input_size: tuple[int, int] | None = None,
                 num_classes: int | None = None, flops: bool = True, reference: str = "sdes") -> list[dict]:
    """One record per row of the reference's table (or the one `model`; a model outside the table
    gets 19 classes at the reference's first input size and no paper figures). `input_size` /
    `num_classes` override the row's.

    `gflops` is always fvcore's count; with `reference="cirkd"` the record also holds
    `cirkd_counter_gflops` (CIRKD's count of the same network), and `gflops_rel_diff` compares the
    count made in the reference's own convention (`counter`) with its figure."""
    if reference not in REFERENCES:
        raise ConfigError(f"--reference: expected one of {', '.join(REFERENCES)}, got {reference!r}")
    ref = REFERENCES[reference]
    rows = ref.rows
    if model is not None:
        rows = [r for r in ref.rows if r.model == model]
        if not rows:
            if model not in MODELS:
                MODELS.get(model)  # raises the one-line "unknown model" error with suggestions
            rows = [PaperFigures(model, 19, ref.rows[0].input_size, None, None)]
    records = []
    for row in rows:
        size = input_size or row.input_size
        classes = num_classes or row.num_classes
        net = build_profiled(row.model, classes, aux=row.aux)
        params_m = count_params(net) / 1e6
        gflops = count_gflops(net, size) if flops else None
        cirkd_gflops = count_cirkd_gflops(net, size) if flops and ref.counter == "cirkd" else None
        same_setting = size == row.input_size and classes == row.num_classes
        paper_params = row.params_m if classes == row.num_classes else None
        paper_gflops = row.gflops if same_setting else None
        counted = cirkd_gflops if ref.counter == "cirkd" else gflops
        record = {
            "reference": reference, "model": row.model, "num_classes": classes, "input_size": list(size),
            "aux": row.aux, "counter": ref.counter,
            "params_m": round(params_m, 6), "gflops": None if gflops is None else round(gflops, 4),
            "paper_params_m": paper_params, "paper_gflops": paper_gflops,
            "params_rel_diff": rel_diff(params_m, paper_params), "gflops_rel_diff": rel_diff(counted, paper_gflops),
        }
        if ref.counter == "cirkd":
            record["cirkd_counter_gflops"] = None if cirkd_gflops is None else round(cirkd_gflops, 4)
        records.append(record)
    return records


def model_profile(model: str, num_classes: int, input_size: tuple[int, int] | list[int]) -> dict:
    """Params (M) and fvcore GFLOPs of one network at `input_size` with `num_classes` classes: the
    numbers `sdesbench profile --model M --classes C --input HxW --json` prints (the report's
    Params / FLOPs columns use this)."""
    (record,) = profile_rows(model, tuple(input_size), num_classes)
    return {"params_m": record["params_m"], "gflops": record["gflops"]}
