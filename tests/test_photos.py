"""The bundled colour dataset ``photos``: region split, classes, determinism."""

from __future__ import annotations

import numpy as np
import torch

from cartlib import data
from cartlib.data.photos import CROPS, PHOTOS, TEST_SHARE, region


def test_photos_splits_are_disjoint_regions_of_each_photo():
    for shape in ((96, 135), (128, 96), (96, 96)):
        (tr_r, tr_c), (te_r, te_c) = region(shape, "train"), region(shape, "test")
        train, test = np.zeros(shape, bool), np.zeros(shape, bool)
        train[tr_r, tr_c], test[te_r, te_c] = True, True
        assert not (train & test).any() and (train | test).all()
        assert abs(test.mean() - TEST_SHARE) < 0.02


def test_photos_no_test_crop_appears_in_training():
    train = data.load_dataset("photos", "train", 16, progress=False)
    test = data.load_dataset("photos", "test", 16, progress=False)
    assert len(train) == CROPS["train"] * len(PHOTOS) and len(test) == CROPS["test"] * len(PHOTOS)
    assert train.num_classes == test.num_classes == len(PHOTOS) == 9
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 1 and y == 0
    # colour: the channels differ (unlike Fashion-MNIST's replicated grey)
    assert (train.images[:50, 0].float() - train.images[:50, 2].float()).abs().mean() > 5
    # no test crop equals any training crop (exact uint8 match)
    seen = {bytes(t.numpy()) for t in train.images}
    assert not any(bytes(t.numpy()) in seen for t in test.images)


def test_photos_limit_spans_every_class_and_is_deterministic():
    a = data.load_dataset("photos", "test", 16, limit=27, progress=False)
    b = data.load_dataset("photos", "test", 16, limit=27, progress=False)
    assert torch.equal(a.images, b.images)
    assert sorted(a.labels.tolist()) == sorted(list(range(9)) * 3)
