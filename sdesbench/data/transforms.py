"""Joint image+mask augmentation (torchvision transforms v2): random scale, crop, flip.

Randomness comes from a per-sample seed, not the global RNG, so augmentation is reproducible
across resumes and worker counts. The crop pads images with 0 and masks with the ignore index.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sdesbench import IGNORE_INDEX

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (the backbones' pre-training)
STD = (0.229, 0.224, 0.225)


def normalize(image: torch.Tensor) -> torch.Tensor:
    return TF.normalize(image.float() / 255.0, MEAN, STD)


class JointTrainTransform:
    def __init__(self, crop: list[int], scale: list[float], flip: bool):
        self.crop = tuple(crop)
        self.scale = tuple(scale)
        self.ops = v2.Compose([
            v2.RandomCrop(self.crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(0.5 if flip else 0.0),
        ])

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lo, hi = self.scale
            s = lo + (hi - lo) * torch.rand(()).item()
            h, w = image.shape[-2:]
            size = [max(1, round(h * s)), max(1, round(w * s))]
            img = tv_tensors.Image(TF.resize(image, size, antialias=True))
            msk = tv_tensors.Mask(TF.resize(mask[None], size, interpolation=v2.InterpolationMode.NEAREST)[0])
            img, msk = self.ops(img, msk)
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()
