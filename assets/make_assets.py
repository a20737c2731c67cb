"""Draws the studio's sample image and its mask (the files beside this script) from simple shapes.

    python assets/make_assets.py

The output is deterministic; rerun it only to change the pictures.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SIZE = 512
TREE_CROWN = (52, 196, 196, 340)  # the box of the tree's round crown; the mask covers the whole tree
TREE_TRUNK = (112, 320, 136, 420)


def sample_image() -> Image.Image:
    """A house under a blue sky, with the sun, green hills and a tree."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):  # sky: deep blue at the top to pale near the horizon
        t = y / SIZE
        draw.line([(0, y), (SIZE, y)], fill=(int(70 + 130 * t), int(130 + 90 * t), int(220 + 30 * t)))
    draw.ellipse((390, 40, 470, 120), fill=(255, 214, 90))
    draw.ellipse((-140, 330, 380, 640), fill=(104, 170, 84))
    draw.ellipse((180, 350, 700, 660), fill=(86, 150, 70))
    # The house: walls, roof, door, two windows, a chimney.
    draw.rectangle((250, 280, 430, 420), fill=(236, 222, 196))
    draw.rectangle((390, 190, 412, 250), fill=(150, 70, 60))
    draw.polygon([(232, 284), (340, 190), (448, 284)], fill=(186, 60, 50))
    draw.rectangle((322, 340, 358, 420), fill=(110, 72, 48))
    for left in (268, 380):
        draw.rectangle((left, 306, left + 34, 336), fill=(150, 200, 235), outline=(90, 80, 70), width=3)
    draw.rectangle(TREE_TRUNK, fill=(110, 76, 50))
    draw.ellipse(TREE_CROWN, fill=(58, 128, 62))
    # A slight blur takes the edge off the shapes, closer to what the models were trained on.
    return image.filter(ImageFilter.GaussianBlur(0.8))


def sample_mask() -> Image.Image:
    """White over the tree (to replace), black elsewhere (to keep); the same size as the image."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = TREE_CROWN
    draw.ellipse((left - 12, top - 12, right + 12, bottom + 12), fill=255)
    left, top, right, bottom = TREE_TRUNK
    draw.rectangle((left - 12, top - 12, right + 12, bottom + 8), fill=255)
    return mask


if __name__ == "__main__":
    sample_image().save(HERE / "sample.png", optimize=True)
    sample_mask().save(HERE / "sample_mask.png", optimize=True)
