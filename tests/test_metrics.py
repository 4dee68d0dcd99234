import torch

from sdesbench.engine.metrics import ConfusionMatrix


def test_confusion_matrix_matches_hand_computation():
    # 3 classes; 255 is ignored. target / prediction for 8 pixels:
    target = torch.tensor([0, 0, 1, 1, 1, 2, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # labelled pixels: 7; correct: 0->0, 1->1, 1->1, 2->2 = 4  => PA = 4/7
    # class 0: tp 1, target 2, pred 3 (pixels 0, 4, 7) -> union 2 + 3 - 1 = 4 -> 1/4
    # class 1: tp 2, target 3, pred 3 -> union 4 -> 2/4
    # class 2: tp 1, target 2, pred 1 -> union 2 -> 1/2
    r = cm.compute()
    assert abs(r["pixel_acc"] - 4 / 7) < 1e-12
    assert r["per_class_iou"] == [0.25, 0.5, 0.5]
    assert abs(r["miou"] - (0.25 + 0.5 + 0.5) / 3) < 1e-12


def test_absent_classes_are_excluded_from_miou():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    r = cm.compute()
    assert r["per_class_iou"] == [1.0, 1.0, None, None]
    assert r["miou"] == 1.0
