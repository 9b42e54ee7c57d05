"""The training loss of the project's SAM: Dice against the binarised target does not pay a mask to grow.

Against a soft target (the object's edge pixels hold fractions), Dice rewards
covering any pixel whose target exceeds half the current Dice, so where the
overlap is poor the best mask is larger than the object. ``hard_dice`` scores
Dice against ``target > 0.5``, the IoU's own criterion (measured: held-out box
mIoU 0.735 -> 0.740 at equal steps; docs/EVALUATION.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eval_jobs.train_sam import TrainConfig, _loss


def _small_object():
    t = torch.zeros(1, 1, 32, 32)
    t[..., 14:16, 14:16] = 1.0           # 4 pixels inside
    t[..., 13:17, 13:17] += 0.4 * (t[..., 13:17, 13:17] == 0)  # 12 edge pixels at 0.4
    exact = torch.where(t > 0.5, 10.0, -10.0)
    grown = torch.where(t > 0.3, 10.0, -10.0)
    return t, exact, grown


def _out(logits):  # the two fields of SamImageSegmentationOutput the loss reads
    return SimpleNamespace(pred_masks=logits[:, :, None], iou_scores=torch.zeros(1, 1, 1))


@pytest.mark.parametrize("hard", [False, True])
def test_dice_target_decides_whether_a_grown_mask_pays(hard):
    t, exact, grown = _small_object()
    l_exact, iou_exact = _loss(_out(exact), t, 0.0, balance=0.0, hard_dice=hard)
    l_grown, iou_grown = _loss(_out(grown), t, 0.0, balance=0.0, hard_dice=hard)
    assert iou_exact == pytest.approx(1.0) and iou_grown == pytest.approx(0.25)  # IoU against target > 0.5
    if hard:
        assert float(l_exact) < float(l_grown) - 0.5
    else:  # the soft target's Dice prefers the mask 4x too large (the defect hard_dice removes)
        assert float(l_grown) < float(l_exact)


def test_the_default_recipe_uses_the_binarised_target():
    assert TrainConfig().hard_dice
