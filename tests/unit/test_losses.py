import itertools
import math

import numpy as np
import pytest
import torch

from sepen.losses import (
    enhance_loss,
    gaussian_kernel,
    norm_loss,
    separate_loss,
    smooth_maps,
    total_loss,
)


def _maps(*concept_maps):
    """(1, N, 1, h, w) from N (h, w) maps."""
    return torch.stack(concept_maps)[None, :, None]


def test_disjoint_maps_do_not_overlap():
    a = torch.zeros(4, 4)
    b = torch.zeros(4, 4)
    a[:2] = 0.7
    b[2:] = 0.9
    assert separate_loss(_maps(a, b)).item() == pytest.approx(0.0, abs=1e-7)


def test_identical_maps_give_half_their_peak():
    a = torch.rand(5, 5, generator=torch.Generator().manual_seed(0))
    assert separate_loss(_maps(a, a.clone())).item() == pytest.approx(a.max().item() / 2, rel=1e-6)


def test_separate_takes_the_worst_pair_over_heads_and_pixels():
    a, b, c = torch.zeros(3, 2, 3, 3)
    a[0, 0, 0], b[1, 2, 2] = 0.8, 0.8  # disjoint
    c[0, 0, 0] = 0.8  # overlaps a at one pixel of head 0
    loss = separate_loss(torch.stack([a, b, c])[None])
    assert loss.item() == pytest.approx(0.4, rel=1e-6)
    pair_values = [
        separate_loss(torch.stack([x, y])[None]).item()
        for x, y in itertools.combinations([a, b, c], 2)
    ]
    assert loss.item() == pytest.approx(max(pair_values))


def test_enhance_is_one_minus_the_weaker_smoothed_peak():
    a = torch.zeros(5, 5)
    b = torch.zeros(5, 5)
    a[2, 2] = 0.6
    b[1:4, 1:4] = 0.5
    k = gaussian_kernel(3, 0.5, "textbook")
    assert k.sum().item() == pytest.approx(1.0)
    centre = (1 / (1 + 2 * torch.exp(torch.tensor(-2.0)))) ** 2  # 1-D weights e^-2, 1, e^-2
    assert k[1, 1].item() == pytest.approx(centre.item(), rel=1e-6)
    peak_a = 0.6 * k[1, 1].item()  # an isolated spike keeps the kernel's centre weight: 0.37
    peak_b = 0.5  # a flat 3x3 block keeps its value at its centre
    maps = _maps(a, b)
    assert enhance_loss(maps, kernel="textbook").item() == pytest.approx(1 - peak_a, rel=1e-6)
    assert enhance_loss(_maps(b, b)).item() == pytest.approx(1 - peak_b, rel=1e-6)
    # the default is the authors' kernel: 1-D weights e^-1, 1, e^-1, centre 0.332
    authors = gaussian_kernel(3, 0.5)
    centre = (1 / (1 + 2 * torch.exp(torch.tensor(-1.0)))) ** 2
    assert authors[1, 1].item() == pytest.approx(centre.item(), rel=1e-6)
    assert authors[1, 1].item() == pytest.approx(0.332, abs=1e-3)
    assert enhance_loss(maps).item() == pytest.approx(1 - 0.6 * centre.item(), rel=1e-6)


def _authors_enhance(maps: np.ndarray) -> float:
    """An independent transcription of the authors' enhance loss for one sample.

    Their GaussianSmoothing builds, per axis, 1 / (sigma sqrt(2 pi)) exp(-((x - mean) /
    (2 sigma))^2) over kernel_size points, multiplies the axes and divides by the sum; each
    map is padded by reflection, convolved, and its maximum over heads and pixels taken; the
    loss is 1 minus the smaller maximum. maps: (N, H, h, w), float64.
    """
    size, sigma = 3, 0.5
    grid = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    kernel = np.ones((size, size))
    for axis in grid:
        mean = (size - 1) / 2
        kernel = kernel * (
            1 / (sigma * math.sqrt(2 * math.pi)) * np.exp(-(((axis - mean) / (2 * sigma)) ** 2))
        )
    kernel = kernel / kernel.sum()
    peaks = []
    for concept in maps:
        best = -np.inf
        for head in concept:
            padded = np.pad(head, 1, mode="reflect")
            h, w = head.shape
            for y in range(h):
                for x in range(w):
                    best = max(best, float((padded[y : y + 3, x : x + 3] * kernel).sum()))
        peaks.append(best)
    return 1.0 - min(peaks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_enhance_loss_equals_the_authors_formula_on_any_maps(seed):
    gen = torch.Generator().manual_seed(seed)
    # random maps, softmax-normalised over the concepts' tokens like attention, and peaked ones
    raw = torch.rand(3, 2, 4, 8, 8, generator=gen, dtype=torch.float64)
    maps = [raw, raw.pow(8), torch.softmax(raw * 6, dim=1)]
    for m in maps:
        ours = enhance_loss(m.float(), reduction="none").double().numpy()
        theirs = np.array([_authors_enhance(sample.numpy()) for sample in m])
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_textbook_kernel_differs_on_peaked_maps():
    spike = torch.zeros(1, 2, 1, 5, 5)
    spike[0, :, 0, 2, 2] = 1.0
    authors = enhance_loss(spike).item()
    textbook = enhance_loss(spike, kernel="textbook").item()
    assert authors == pytest.approx(1 - 0.332, abs=1e-3)
    assert textbook == pytest.approx(1 - 0.619, abs=1e-3)
    with pytest.raises(ValueError, match="kernel form 'gauss'"):
        gaussian_kernel(3, 0.5, "gauss")


def test_smoothing_uses_reflect_padding():
    x = torch.ones(1, 1, 4, 4)
    assert torch.allclose(smooth_maps(x), x)  # reflect padding keeps a constant map constant


def test_losses_are_per_sample_then_batch_mean():
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 2, 2, 4, 4, generator=gen)
    per = separate_loss(maps, reduction="none")
    assert per.shape == (3,)
    for i in range(3):
        assert per[i].item() == pytest.approx(separate_loss(maps[i : i + 1]).item())
    assert separate_loss(maps).item() == pytest.approx(per.mean().item())
    en = enhance_loss(maps, reduction="none")
    assert enhance_loss(maps).item() == pytest.approx(en.mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_near_zero_and_half_precision_maps_stay_finite(dtype):
    maps = torch.zeros(2, 3, 2, 4, 4, dtype=dtype, requires_grad=True)
    parts = total_loss(
        maps, norm=norm_loss(torch.zeros(2, 4, dtype=dtype), torch.zeros(2, 4, dtype=dtype))
    )
    parts["loss"].backward()
    assert all(torch.isfinite(v).all() for v in parts.values())
    assert torch.isfinite(maps.grad).all()
    assert parts["separate"].item() == 0.0
    assert parts["enhance"].item() == 1.0
    tiny = torch.full((1, 2, 1, 3, 3), 1e-7, dtype=dtype)
    assert torch.isfinite(separate_loss(tiny))


def test_norm_loss_is_mse_per_sample():
    pred = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    frozen = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert norm_loss(pred, frozen, reduction="none").tolist() == [2.5, 2.0]
    assert norm_loss(pred, frozen).item() == pytest.approx(2.25)
    with pytest.raises(ValueError, match="differ in shape"):
        norm_loss(pred, frozen[:1])


def test_total_loss_weights():
    gen = torch.Generator().manual_seed(2)
    maps = torch.rand(2, 2, 1, 4, 4, generator=gen)
    parts = total_loss(maps, lambda_sep=1.0, lambda_en=0.5, norm=torch.tensor(2.0), lambda_norm=0.5)
    expected = parts["separate"] + 0.5 * parts["enhance"] + 0.5 * 2.0
    assert parts["loss"].item() == pytest.approx(expected.item())


def test_bad_map_shapes_are_rejected():
    with pytest.raises(ValueError, match="N >= 2"):
        separate_loss(torch.rand(1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, N, H, h, w\)"):
        enhance_loss(torch.rand(2, 4, 4))
