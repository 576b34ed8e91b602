"""What `fscs predict` writes: working size, class colours, label maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fscs.errors import FSCSError
from fscs.predict import run_predict
from fscs.predict_output import class_colour, label_map, work_size


def test_work_size_caps_the_longer_side_and_zero_keeps_the_size():
    assert work_size(2000, 1000, 1024) == (1024, 512)
    assert work_size(300, 200, 1024) == (300, 200)
    assert work_size(300, 200, 0) == (300, 200)  # 0 = original size (it made 1 x 1 masks before)
    with pytest.raises(FSCSError, match="--max-side -1 >= 0"):
        run_predict("no-run", "no-support", ["x.png"], "out", max_side=-1)


def test_label_map_paints_only_present_classes():
    logits = torch.zeros(2, 2, 4, 4)
    logits[:, 1] = 3.0  # both classes: foreground everywhere
    logits[1, 1, :, :2] = 6.0  # class 2 stronger on the left half
    labels = label_map(torch.tensor([0.9, 0.9]), logits.log_softmax(1), (4, 4), 0.5)
    assert labels.dtype == np.uint8 and (labels[:, :2] == 2).all() and (labels[:, 2:] >= 1).all()
    none = label_map(torch.tensor([0.1, 0.2]), logits.log_softmax(1), (4, 4), 0.5)
    assert (none == 0).all()  # absent classes are never painted
    assert class_colour(0) != class_colour(1) and len({class_colour(i) for i in range(40)}) == 40
