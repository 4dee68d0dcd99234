import torch

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import IterationSampler, TrainView, class_pixel_counts
from sdesbench.data.tiny import TinyScenes
from sdesbench.data.transforms import JointTrainTransform


def test_tiny_dataset_is_deterministic_and_imbalanced():
    a, b = TinyScenes(None, "train"), TinyScenes(None, "train")
    ia, ma = a.load(5)
    ib, mb = b.load(5)
    assert torch.equal(ia, ib) and torch.equal(ma, mb)
    assert ia.dtype == torch.uint8 and ia.shape == (3, 64, 64) and ma.shape == (64, 64)
    assert (ma == IGNORE_INDEX).any()
    counts = class_pixel_counts(a).double()
    share = counts / counts.sum()
    assert len(share) == 11 and (share > 0).all()
    assert share.max() / share.min() > 20  # frequent and rare classes, as in CamVid


def test_sampler_resumes_mid_stream_and_shards_exactly():
    full = list(IterationSampler(n=10, batch_size=3, iters=7, seed=4))
    tail = list(IterationSampler(n=10, batch_size=3, iters=7, seed=4, start_iter=3))
    assert tail == full[9:]
    # two ranks with batch 3 each cover the single-process stream of global batch 6
    single = list(IterationSampler(n=10, batch_size=6, iters=4, seed=1))
    r0 = list(IterationSampler(n=10, batch_size=3, iters=4, seed=1, rank=0, world_size=2))
    r1 = list(IterationSampler(n=10, batch_size=3, iters=4, seed=1, rank=1, world_size=2))
    assert sorted(r0 + r1) == sorted(single)
    # every epoch is a permutation of the dataset
    assert sorted(k[0] for k in IterationSampler(n=10, batch_size=5, iters=2, seed=0)) == list(range(10))


def test_crop_pads_mask_with_ignore_index_and_is_seeded():
    t = JointTrainTransform([40, 40], [1.0, 1.0], flip=True)
    image = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    mask = torch.ones(20, 30, dtype=torch.int64)
    img, msk = t(image, mask, seed=3)
    assert img.shape == (3, 40, 40) and msk.shape == (40, 40)
    assert int((msk == 1).sum()) == 20 * 30  # every original pixel kept, the rest is padding
    assert int((msk == IGNORE_INDEX).sum()) == 40 * 40 - 20 * 30
    assert int((img == 0).all(0).sum()) == 40 * 40 - 20 * 30  # image padded with 0
    img2, msk2 = t(image, mask, seed=3)
    assert torch.equal(img, img2) and torch.equal(msk, msk2)


def test_scale_and_flip_move_image_and_mask_together():
    t = JointTrainTransform([32, 32], [0.5, 2.0], flip=True)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, :8] = 255  # bright left strip labelled 1
    mask = torch.zeros(32, 32, dtype=torch.int64)
    mask[:, :8] = 1
    for seed in range(8):
        img, msk = t(image, mask, seed)
        bright = img[0] > 127
        labelled = msk == 1
        # image and mask agree away from the resize boundary
        agree = (bright == labelled) | (msk == IGNORE_INDEX)
        assert agree.float().mean() > 0.9


def test_train_view_returns_normalised_crops():
    view = TrainView(TinyScenes(None, "train"), [48, 48], [0.5, 2.0], True)
    x, y = view[(0, 123)]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y.shape == (48, 48)
    assert -3 < float(x.mean()) < 3
