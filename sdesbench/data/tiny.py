"""Built-in tiny dataset: synthetic street scenes generated deterministically in code.

Eleven classes named like CamVid's, with very different pixel frequencies (road and sky cover
large areas, poles and pedestrians a few pixels) and void pixels (255) around cars and in
random patches. Each class has its own colour and texture, jittered per image and overlaid
with noise, so a network must learn colour *and* texture: learnable in a few hundred CPU
iterations, far from trivial for an untrained model. Nothing is downloaded or stored: image i
of a split is a pure function of (split, i).

Why 64x64: evaluation is on whole images, and a whole image should look to the network like the
small crops it trains on (48-64 px, 6x6 to 8x8 maps at output stride 8). The dilated depthwise
convolutions of MobileNetV2 / EfficientNet-B0 at output stride 8 (5x5 kernels, dilation 4: +-8 px)
see mostly zero padding on such maps; on a larger image the interior positions give activations
far outside BatchNorm's running statistics, and eval-mode accuracy collapsed (EfficientNet-B0 after
100 iterations on 48 px crops: 56% pixel accuracy on 48 px views, 41% at 96x96, 15% at 96x128).
Real datasets at the paper's 512 crops have no such gap; where a protocol trains on small crops of
downscaled images (the `mini` preset on CamVid), `eval.scale` evaluates at the training scale instead.
"""
from __future__ import annotations


import torch

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import DATASETS, SegDataset

CLASS_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist"]
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
# Base colour (RGB 0..1) and texture (kind, spatial frequency) per class. Some colours are close
# on purpose (Road/Pavement, Pole/Fence, Pedestrian/Bicyclist) so texture matters.
COLOURS = torch.tensor([
    [0.55, 0.70, 0.90], [0.60, 0.35, 0.30], [0.75, 0.75, 0.65], [0.40, 0.40, 0.45], [0.48, 0.44, 0.52],
    [0.20, 0.50, 0.20], [0.90, 0.80, 0.10], [0.70, 0.68, 0.58], [0.15, 0.20, 0.70], [0.85, 0.35, 0.55],
    [0.85, 0.40, 0.45]])
TEXTURES = [("smooth", 0), ("hstripes", 3), ("smooth", 0), ("noise", 0), ("checker", 4), ("noise", 0),
            ("smooth", 0), ("vstripes", 2), ("smooth", 0), ("hstripes", 2), ("checker", 2)]
SPLIT_SIZES = {"train": 120, "val": 30}
SPLIT_SEEDS = {"train": 1, "val": 2}


def _texture(kind: str, freq: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    phase = int(torch.randint(0, 8, (1,), generator=g))
    if kind == "hstripes":
        return 0.18 * (((yy + phase) // freq) % 2).float() - 0.09
    if kind == "vstripes":
        return 0.18 * (((xx + phase) // freq) % 2).float() - 0.09
    if kind == "checker":
        return 0.16 * ((((yy + phase) // freq) + (xx // freq)) % 2).float() - 0.08
    if kind == "noise":
        return 0.12 * torch.randn(h, w, generator=g)
    return torch.zeros(h, w)


def render(seed: int, h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene: (uint8 3xHxW image, int64 HxW label map with 255 = void)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    randint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    label = torch.zeros(h, w, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")

    horizon = int(h * rand(0.25, 0.45))
    kerb = int(h * rand(0.55, 0.7))
    # wavy skyline: buildings below it, sky above
    skyline = (horizon - h * 0.15 * (1 + torch.sin(xx[0].float() / rand(6, 14) + rand(0, 6)))).long()
    label[yy >= skyline[None, :].expand(h, w)] = 1
    label[yy >= kerb] = 4  # pavement
    road_top = kerb + randint(3, 8)
    label[yy >= road_top] = 3
    # trees: blobs on the building band
    for _ in range(randint(1, 4)):
        cy, cx, r = rand(horizon * 0.4, kerb - 4), rand(0, w), rand(5, 12)
        label[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = 5
    # fence: a low band segment along the kerb
    if torch.rand((), generator=g) < 0.6:
        x0 = randint(0, w // 2)
        label[kerb - 6:kerb, x0:x0 + randint(20, w // 2)] = 7
    void = torch.zeros(h, w, dtype=torch.bool)
    # cars on the road, with a void rim (annotation boundary)
    for _ in range(randint(1, 4)):
        ch, cw = randint(8, 16), randint(16, 30)
        y0, x0 = randint(road_top - ch // 2, h - ch), randint(-cw // 2, w - cw // 2)
        box = (yy >= y0) & (yy < y0 + ch) & (xx >= x0) & (xx < x0 + cw)
        rim = (yy >= y0 - 1) & (yy < y0 + ch + 1) & (xx >= x0 - 1) & (xx < x0 + cw + 1) & ~box
        void |= rim
        label[box] = 8
    # poles with signs on top
    for _ in range(randint(1, 4)):
        x0, top = randint(0, w - 2), randint(horizon - 10, kerb - 10)
        label[max(top, 0):kerb + 2, x0:x0 + 2] = 2
        if torch.rand((), generator=g) < 0.7:
            label[max(top - 5, 0):max(top, 0) + 1, max(x0 - 3, 0):x0 + 5] = 6
    # pedestrians on the pavement, bicyclists on the road
    for cls, (y_lo, y_hi), n in ((9, (kerb - 14, kerb - 4), randint(0, 4)), (10, (road_top, h - 10), randint(0, 3))):
        for _ in range(n):
            y0, x0 = randint(max(y_lo, 0), max(y_hi, y_lo + 1)), randint(0, w - 5)
            if cls == 9:
                label[y0:y0 + 12, x0:x0 + 4] = 9
            else:
                label[((yy - y0 - 4) ** 2 + (xx - x0 - 4) ** 2) < 20] = 10
    # random void patches
    for _ in range(randint(0, 3)):
        y0, x0 = randint(0, h - 4), randint(0, w - 4)
        void[y0:y0 + randint(2, 6), x0:x0 + randint(2, 6)] = True

    image = torch.zeros(3, h, w)
    light = rand(0.8, 1.15)
    for c in range(len(CLASS_NAMES)):
        where = label == c
        if not where.any():
            continue
        colour = (COLOURS[c] * light + 0.06 * torch.randn(3, generator=g)).clamp(0, 1)
        tex = _texture(*TEXTURES[c], h, w, g)
        layer = colour[:, None, None] + tex[None]
        image = torch.where(where[None], layer, image)
    image = image + 0.05 * torch.randn(3, h, w, generator=g)
    image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    label[void] = IGNORE_INDEX
    return image, label


@DATASETS.register("tiny")
class TinyScenes(SegDataset):
    """`tiny`: 120 train / 30 val synthetic 64x64 scenes, 11 CamVid-like classes."""

    num_classes = 11
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val")
    needs_root = False
    generated = True  # nothing on disk to check

    def __init__(self, root=None, split: str = "train", size: tuple[int, int] = (64, 64)):
        super().__init__(root, split)
        self.size = size

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return render(SPLIT_SEEDS[self.split] * 100_003 + index, *self.size)

    def sample_id(self, index: int) -> str:
        return f"tiny/{self.split}/{index:04d}"

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self.size)
