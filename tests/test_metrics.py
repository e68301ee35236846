"""The headline metrics against values computed by hand: PSNR and the nearest-context-view baseline."""

from __future__ import annotations

import math

import pytest
import torch

from gqn.metrics import MSE_FLOOR, mean_context_view, nearest_context_view, psnr


def test_psnr_against_hand_computed_values():
    target = torch.zeros(3, 3, 2, 2)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1, 0] = 1.0  # one channel of three fully wrong: MSE 1/3 -> 10 log10(3) = 4.771 dB
    # pred[2] is exact: MSE 0 is floored at 1e-4 -> 40 dB (a perfect image does not dominate a mean)
    got = psnr(pred, target)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx([20.0, 10 * math.log10(3), 40.0], abs=1e-4)
    assert MSE_FLOOR == 1e-4
    half = torch.full((1, 3, 4, 4), 0.5)
    assert psnr(half, torch.ones(1, 3, 4, 4)).item() == pytest.approx(-10 * math.log10(0.25), abs=1e-5)  # 6.02 dB


def test_nearest_context_view_picks_the_closest_pose_per_scene():
    # scene 0: the query sits on context view 2; scene 1: closer to view 1 in x, but view 1 differs in yaw
    poses = torch.zeros(2, 3, 7)
    poses[0, :, 0] = torch.tensor([0.0, 1.0, 2.0])  # x
    poses[1, :, 0] = torch.tensor([0.0, 1.0, 5.0])
    poses[1, 1, 3] = 0.5  # view 1 of scene 1 also differs in sin(yaw): squared distance 0.4^2 + 0.5^2 = 0.41
    query = torch.zeros(2, 7)
    query[0, 0], query[1, 0] = 2.0, 0.6  # scene 1: distances^2 to views 0, 1, 2 = 0.36, 0.41, 19.36
    images = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)
    got = nearest_context_view(images, poses, query)
    assert got.shape == (2, 3, 2, 2)
    assert got[0].unique().tolist() == [2.0]  # scene 0, view 2
    assert got[1].unique().tolist() == [3.0]  # scene 1, view 0 (all 7 numbers count, not only x, y, z)


def test_mean_context_view_is_the_average_image():
    images = torch.stack([torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)], dim=1)  # [1, 2, 3, 2, 2]
    assert torch.equal(mean_context_view(images), torch.full((1, 3, 2, 2), 0.5))
