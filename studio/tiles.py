"""Tiles: how an image too large for one answer is cut into overlapping tiles, and how the tiles'
outputs are stitched back into one image with feathered seams. Plain geometry and pixels: no
network, no model table (studio.planning decides when to tile and with which sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sdserve.catalog import SIZE_MULTIPLE

# Output rows stitched at a time (bounds the float accumulator to ~25 MB for a 4096 px wide image).
STITCH_BAND_ROWS = 256


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of side `tile` covering [0, length) with neighbours overlapping by
    at least `overlap`, spread evenly (so every tile is whole: the last ends at `length`)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    # Even spacing: steps of at most tile - overlap (count was chosen so), rounded to whole pixels.
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


@dataclass(frozen=True)
class TileLayout:
    """Tiles over an input image of `size`; boxes row by row, in input pixels."""

    size: tuple[int, int]  # (width, height) of the image the tiles are cut from
    tile_size: tuple[int, int]  # (width, height) of every tile
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    scale: int  # output px per input px

    @classmethod
    def for_image(cls, size: tuple[int, int], tile: int, overlap: int, scale: int) -> TileLayout:
        width, height = size
        tile_size = (min(tile, width), min(tile, height))
        return cls(size, tile_size, tuple(tile_positions(width, tile, overlap)),
                   tuple(tile_positions(height, tile, overlap)), scale)

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each tile, row by row, as PIL's crop takes them."""
        width, height = self.tile_size
        return [(x, y, x + width, y + height) for y in self.ys for x in self.xs]

    @property
    def output_size(self) -> tuple[int, int]:
        return self.size[0] * self.scale, self.size[1] * self.scale

    @property
    def output_tile_size(self) -> tuple[int, int]:
        return self.tile_size[0] * self.scale, self.tile_size[1] * self.scale


def axis_weights(starts: Sequence[int], tile: int, length: int) -> list[np.ndarray]:
    """Blend weights along one axis (output pixels): per tile, one weight per pixel it covers.

    Each tile's weight ramps linearly from ~0 to 1 across its overlap with the neighbour on that
    side (no ramp at the image's border, so edges keep their own tile), and the weights are then
    normalized to sum to exactly 1 at every pixel: where tiles agree the result is their value,
    where they differ it fades from one to the other across the overlap.
    """
    centres = np.arange(tile) + 0.5  # pixel centres, so no weight is 0 and no pixel is dropped
    weights = []
    for index, start in enumerate(starts):
        weight = np.ones(tile)
        if index > 0 and (ramp := starts[index - 1] + tile - start) > 0:
            weight = np.minimum(weight, centres / ramp)
        if index < len(starts) - 1 and (ramp := start + tile - starts[index + 1]) > 0:
            weight = np.minimum(weight, (tile - centres) / ramp)
        weights.append(weight)
    total = np.zeros(length)
    for start, weight in zip(starts, weights):
        total[start : start + tile] += weight
    return [weight / total[start : start + tile] for start, weight in zip(starts, weights)]


def stitch(layout: TileLayout, tiles: Sequence[Image.Image]) -> Image.Image:
    """The output image from its tiles' outputs (row by row, as `layout.boxes`), seams feathered."""
    out_width, out_height = layout.output_size
    tile_width, tile_height = layout.output_tile_size
    xs = [x * layout.scale for x in layout.xs]
    ys = [y * layout.scale for y in layout.ys]
    column_weights = axis_weights(xs, tile_width, out_width)
    row_weights = axis_weights(ys, tile_height, out_height)
    rgb = [tile.convert("RGB") for tile in tiles]
    output = np.empty((out_height, out_width, 3), dtype=np.uint8)
    # A band of output rows at a time, in float64 (exact: weights summing to 1 give back equal
    # values to well within rounding), so a 4096 px image never holds a full float copy.
    for top in range(0, out_height, STITCH_BAND_ROWS):
        bottom = min(top + STITCH_BAND_ROWS, out_height)
        band = np.zeros((bottom - top, out_width, 3))
        for row, y in enumerate(ys):
            first, last = max(top, y), min(bottom, y + tile_height)
            if first >= last:
                continue
            row_weight = row_weights[row][first - y : last - y]
            for column, x in enumerate(xs):
                tile = rgb[row * len(xs) + column].crop((0, first - y, tile_width, last - y))
                pixels = np.asarray(tile, dtype=np.float64)
                weight = row_weight[:, None] * column_weights[column][None, :]
                band[first - top : last - top, x : x + tile_width] += pixels * weight[:, :, None]
        output[top:bottom] = np.clip(np.rint(band), 0, 255).astype(np.uint8)
    return Image.fromarray(output, "RGB")


def cut_tiles(image: Image.Image, side: int, overlap: int, scale: int) -> tuple[TileLayout, list[Image.Image]]:
    """The layout of `side` px tiles over `image` and the tiles themselves. The server resizes an
    image down to multiples of 8 (LANCZOS) before working on it; doing the same here first gives
    the output size it would have untiled, and tiles it will not resize again."""
    width, height = image.size
    snapped = (width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE)
    image = image.convert("RGB")
    if snapped != image.size:
        image = image.resize(snapped, Image.Resampling.LANCZOS)
    layout = TileLayout.for_image(snapped, side, overlap, scale)
    return layout, [image.crop(box) for box in layout.boxes]


def min_overlap(layout: TileLayout) -> int:
    """The least overlap of two neighbouring tiles, in input px (0 for a single tile)."""
    gaps = [b - a for a, b in zip(layout.xs, layout.xs[1:])] + [b - a for a, b in zip(layout.ys, layout.ys[1:])]
    sides = [layout.tile_size[0]] * (len(layout.xs) - 1) + [layout.tile_size[1]] * (len(layout.ys) - 1)
    return min((side - gap for side, gap in zip(sides, gaps)), default=0)
