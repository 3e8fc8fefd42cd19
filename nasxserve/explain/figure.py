"""Render an explanation as a PNG, in the manner of NASXNet's figure 1 / ProtoPNet's "this looks like that".

Left: the input with a coloured box for each shown prototype, drawn by the explanation's region rule
(:mod:`nasxserve.regions`) and named in the caption. Right, one row per
prototype: the matched part of the input, the prototype's source patch, the source image with its
box, and the arithmetic ``similarity x weight = contribution``. Below: the class's logit as the sum of
all contributions. Pillow only (no matplotlib, no torch).
"""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
THUMB = 96
PAD = 12
BG = (255, 255, 255)
INK = (20, 20, 20)
# what a box on the input shows, by the region rule that drew it (nasxserve.regions)
REGION_CAPTIONS = {"evidence": "Boxes: the input the similarity depends on (hiding it lowers the similarity most).",
                   "activation": "Boxes: where the prototype's similarity map peaks (ProtoPNet's rule)."}


def _source_note(explanation: dict[str, Any], evidence: list[dict[str, Any]]) -> str:
    """A warning when the training patches are boxed by another rule than the image (a bundle whose run was
    trained before this version of the evidence rule)."""
    if all(ev.get("source_regions", explanation.get("regions")) == explanation.get("regions") for ev in evidence):
        return ""
    return (" The training images' boxes show where the similarity map peaks: the bundle's run was trained before "
            "this version of the evidence rule.")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: one bitmap size
        return ImageFont.load_default()


def wrapped(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels in ``font`` (a word wider than that
    keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _fit(img: Image.Image, side: int) -> Image.Image:
    """Scale to ``side`` pixels on the longer edge; nearest-neighbour when enlarging keeps pixels crisp."""
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)


def render_explanation(image: Image.Image, explanation: dict[str, Any], class_index: int,
                       read_file: Callable[[str], bytes], title: str = "") -> Image.Image:
    """Draw ``explanation["explanations"][class_index]`` (a dict from ``Bundle.explain``) over ``image``.

    Args:
        image: the caller's original image (any mode; boxes are in its pixels).
        explanation: one image's explanation.
        class_index: which of its explained classes to draw (0 = the top prediction).
        read_file: returns a bundle file's bytes, for the prototype PNGs.
    """
    cls = explanation["explanations"][class_index]
    evidence = cls["evidence"]
    big = 4 * THUMB
    view = _fit(image.convert("RGB"), big)
    sx, sy = view.width / image.width, view.height / image.height
    draw = ImageDraw.Draw(view)
    for i, ev in enumerate(evidence):
        x0, y0, x1, y1 = ev["box"]
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=COLOURS[i % len(COLOURS)],
                       width=max(2, big // 100))

    font, small = _font(16), _font(13)
    row_h = THUMB + PAD
    width = PAD + big + 2 * PAD + 3 * (THUMB + PAD) + 330
    caption = wrapped("this part of the input ... looks like this prototype ... from this training image. "
                      + REGION_CAPTIONS[explanation.get("regions", "activation")] + _source_note(explanation, evidence),
                      small, width - 2 * PAD)
    header = PAD + 22 + 18 * len(caption) + 4
    height = header + max(big, row_h * max(len(evidence), 1)) + 70
    fig = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(fig)
    d.text((PAD, PAD), title or f"predicted: {cls['class']}  (p = {cls['probability']:.3f})", fill=INK, font=font)
    for i, line in enumerate(caption):
        d.text((PAD, PAD + 22 + 18 * i), line, fill=(90, 90, 90), font=small)
    fig.paste(view, (PAD, header))
    x = PAD + big + 2 * PAD
    for i, ev in enumerate(evidence):
        y = header + i * row_h
        colour = COLOURS[i % len(COLOURS)]
        x0, y0, x1, y1 = ev["box"]
        crop = image.convert("RGB").crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
        tiles = [crop, Image.open(io.BytesIO(read_file(ev["patch"]))), Image.open(io.BytesIO(read_file(ev["context"])))]
        for t, tile in enumerate(tiles):
            thumb = _fit(tile.convert("RGB"), THUMB)
            tx = x + t * (THUMB + PAD)
            fig.paste(thumb, (tx + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        d.rectangle((x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=colour, width=3)
        tx = x + 3 * (THUMB + PAD)
        twins = ev.get("duplicates") or []
        label = f"prototype {ev['prototype']}" + (f" (x{1 + len(twins)}, identical)" if twins else "")
        d.text((tx, y + 8), f"{label} (class {ev['prototype_class']})", fill=colour, font=font)
        d.text((tx, y + 34), f"similarity {ev['similarity']:.3f} x weight {ev['weight']:.3f}", fill=INK, font=small)
        d.text((tx, y + 54), f"= {ev['contribution']:+.3f} to the logit of {cls['class']}", fill=INK, font=small)
    shown = sum(ev["contribution"] for ev in evidence)
    y = height - 58
    d.text((PAD, y), f"logit of {cls['class']} = {cls['logit']:.3f} = the {len(evidence)} contributions shown "
                     f"({shown:+.3f}) and the other prototypes' contributions "
                     f"({cls['evidence_total'] - shown:+.3f})", fill=INK, font=small)
    return fig
