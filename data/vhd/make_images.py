"""Regenerate the synthetic VHD test images (deterministic; PIL only): ``python data/vhd/make_images.py``.

Simple coloured shapes on plain backgrounds, 224x224 PNG, so prompts have an unambiguous answer
(shape, colour, count). They are the project's own drawings, free to redistribute.
"""
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 224

SHAPES = {
    "red_circle": ("white", [("ellipse", (52, 52, 172, 172), "red")]),
    "blue_square": ("yellow", [("rectangle", (57, 57, 167, 167), "blue")]),
    "green_triangle": ("black", [("polygon", [(112, 40), (190, 180), (34, 180)], "green")]),
    "two_shapes": ("white", [("ellipse", (20, 60, 100, 140), "red"), ("rectangle", (124, 60, 204, 140), "blue")]),
    "three_dots": ("lightgray", [("ellipse", (20 + 70 * i, 92, 60 + 70 * i, 132), "purple") for i in range(3)]),
    "orange_stripes": ("white", [("rectangle", (0, 28 + 56 * i, SIZE, 56 + 56 * i), "orange") for i in range(4)]),
}


def main() -> None:
    for name, (bg, items) in SHAPES.items():
        im = Image.new("RGB", (SIZE, SIZE), bg)
        d = ImageDraw.Draw(im)
        for kind, xy, fill in items:
            getattr(d, kind)(xy, fill=fill)
        im.save(HERE / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
