"""ASLoRA's distance heatmap, pixel by pixel: each cell's colour, grey and outline mean what
``render_heatmap``'s docstring says."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_aslora.train.heatmap import MISSING_RGB, OUTLINE_RGB, colormap, layer_distances, render_heatmap

INF = float("inf")


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def red_mask(image: np.ndarray) -> np.ndarray:
    return np.all(image == OUTLINE_RGB, axis=-1)


def perimeter(size: int, lo: int, hi: int) -> np.ndarray:
    """1-px border of the square [lo, hi) x [lo, hi) in a size x size mask."""
    mask = np.zeros((size, size), dtype=bool)
    mask[lo, lo:hi] = mask[hi - 1, lo:hi] = mask[lo:hi, lo] = mask[lo:hi, hi - 1] = True
    return mask


def test_layer_distances_expand_groups_to_layers_and_take_the_root():
    sq = np.array([[0.0, 4.0, INF], [4.0, 0.0, 16.0], [INF, 16.0, 0.0]])
    values = layer_distances(sq, [(0, 1), (2,), (3, 4, 5)], 6)
    assert values.shape == (6, 6)
    assert values[0, 1] == 0.0 and values[1, 2] == 2.0 and values[2, 5] == 4.0 and values[4, 3] == 0.0
    assert np.isnan(values[0, 3]) and np.isnan(values[5, 1])
    assert np.array_equal(values, values.T, equal_nan=True)


def test_a_group_is_at_distance_zero_from_itself_whatever_the_diagonal_holds():
    """The coordinator's matrix holds inf on its diagonal (never a merge candidate): the picture
    still shows each group as a block of zeros, the darkest colour, not as pairs not computed."""
    sq = torch.tensor([[INF, 4.0], [4.0, INF]], dtype=torch.float64)
    values = layer_distances(sq, [(0, 1), (2,)], 3)
    assert values[0, 0] == values[0, 1] == values[2, 2] == 0.0 and values[1, 2] == 2.0
    image = render_heatmap(sq, [(0, 1), (2,)], 3, target_px=30)
    assert tuple(image[5, 15]) == tuple(image[25, 25]) == tuple(colormap(0.0))
    assert tuple(sq.diagonal()) == (INF, INF)  # the caller's matrix is left as it was


def test_render_heatmap_colours_grey_and_outlines():
    groups = [(0, 1), (2,), (3, 4, 5)]
    sq = np.array([[0.0, 4.0, INF], [4.0, 0.0, 16.0], [INF, 16.0, 0.0]])
    image = render_heatmap(sq, groups, 6, target_px=60)          # 10-px cells, 1-px outline
    assert image.shape == (60, 60, 3) and image.dtype == np.uint8

    def centre(a: int, b: int) -> tuple[int, ...]:
        return tuple(image[10 * a + 5, 10 * b + 5])

    assert centre(0, 3) == centre(5, 1) == MISSING_RGB        # inf: grey
    assert centre(0, 1) == centre(2, 2) == tuple(colormap(0.0))
    assert centre(1, 2) == tuple(colormap(0.5))               # 2 of the largest finite 4
    assert centre(2, 4) == tuple(colormap(1.0))
    # Merged groups outlined on their diagonal block, the singleton (layer 2) not.
    np.testing.assert_array_equal(red_mask(image), perimeter(60, 0, 20) | perimeter(60, 30, 60))


def test_render_heatmap_outlines_every_cell_pair_of_a_non_contiguous_group():
    image = render_heatmap(np.array([[0.0, 1.0], [1.0, 0.0]]), [(1,), (0, 2)], 3, target_px=30)
    expected = np.zeros((30, 30), dtype=bool)
    for a in (0, 2):
        for b in (0, 2):
            cell = np.zeros((30, 30), dtype=bool)
            cell[10 * a:10 * a + 10, 10 * b:10 * b + 10] = perimeter(10, 0, 10)
            expected |= cell
    np.testing.assert_array_equal(red_mask(image), expected)


def test_render_heatmap_outline_grows_with_large_cells():
    image = render_heatmap(np.zeros((1, 1)), [(0, 1)], 2, target_px=60)   # 30-px cells: 3-px outline
    red = red_mask(image)
    assert red[:3].all() and red[-3:].all() and red[:, :3].all() and red[:, -3:].all()
    assert not red[3:-3, 3:-3].any()


def test_colour_brightens_monotonically_with_distance():
    assert np.all(np.diff(luminance(colormap(np.linspace(0.0, 1.0, 20)))) > 0)
    n = 6
    sq = torch.tensor([[float(i - j) ** 2 for j in range(n)] for i in range(n)])
    row = render_heatmap(sq, [(i,) for i in range(n)], n, target_px=60)[5, 5::10]
    assert np.all(np.diff(luminance(row.astype(np.float64))) > 0)
    assert not red_mask(render_heatmap(sq, [(i,) for i in range(n)], n)).any()   # singletons: no outline


def test_render_heatmap_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2x2"):
        render_heatmap(np.zeros((3, 3)), [(0,), (1,)], 2)
    with pytest.raises(ValueError, match="two groups"):
        render_heatmap(np.zeros((2, 2)), [(0, 1), (1,)], 2)
