"""``shapes``: a generated dataset whose class is decided by one small part, with that part's true box.

It exists to check explanations: a prototype network that classifies these images correctly for the right
reason must point at the class glyph, whose box is known exactly.

Each S x S RGB image (default 32x32) holds:

- a cluttered grey background: a random grey level, low-contrast grey blobs and lines, and pixel noise,
  all scaled by ``clutter`` (0 = flat grey, 1 = busiest). It stays grey (its channels differ by a few
  levels), so no background pixel can pass for a glyph colour;
- the class glyph: a P x P shape (default 8x8, 6% of the image: about what ProtoPNet's 95th-percentile
  activation box covers) in one colour, at a uniformly random place. A class is a (shape, colour) pair and
  is named after it, e.g. ``red-triangle``;
- ``distractors`` more glyphs of the same size, each a (shape, colour) pair that is no class's, drawn
  uniformly from one pool shared by every class. Every class shape appears in that pool in other colours
  and every class colour in other shapes, so neither a shape nor a colour tells the class: only the class
  glyph does.

Glyphs are at least one pixel apart, so the class glyph is never occluded, and every glyph touches all four
sides of its P x P square, so the ground-truth part box (x0, y0, x1, y1; x1, y1 exclusive) is the class
glyph's tight bounding box.

Generation is deterministic: image i of class k in a split is drawn from its own numpy Generator seeded
with (seed, split, k, i), so changing one count leaves every other image as it was. Images come in class
order (all of class 0 first).

``--data shapes`` generates the default dataset in memory (about a second); ``--data shapes:PATH`` reads a
folder written by ``nasx data shapes PATH`` (:func:`write_shapes`)::

    PATH/shapes.json                      format version, generator options, classes and distractor pool
    PATH/parts.csv                        split,path,label,x0,y0,x1,y1 (path relative to PATH)
    PATH/{train,val,test}/<class>/NNNNN.png

Either way the images are normalised with the training split's channel statistics and
``Dataset.part_boxes`` is set: ``ImageSet.boxes`` are the class glyphs' boxes.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from nasxserve.data.decode import Manifest, Problem, Split, build_dataset, check_image_size
from nasxserve.errors import ConfigError, DataError
from nasxserve.io import fsync_tree, replace_folder, sibling_folder

if TYPE_CHECKING:
    from nasxserve.data.base import Dataset

FORMAT_VERSION = 1
META = "shapes.json"
PARTS = "parts.csv"
HEADER = ["split", "path", "label", "x0", "y0", "x1", "y1"]
SPLITS = ("train", "val", "test")
LAYOUT = (f"expected PATH/{META}, PATH/{PARTS} ({','.join(HEADER)}) and PATH/{{train,val,test}}/<class>/NNNNN.png, "
          f"as `nasx data shapes PATH` writes them")

SHAPES = ("triangle", "circle", "square", "diamond", "plus", "cross", "frame", "bars")
COLOURS: dict[str, tuple[int, int, int]] = {   # saturated, any two at least 70 levels apart in some channel
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (230, 210, 40),
    "magenta": (215, 60, 215), "cyan": (40, 200, 215), "orange": (245, 140, 30), "purple": (135, 60, 205),
}
# Class k is (SHAPES[k % 8], colour (k % 8 + k // 8) % 8): the pairs on the first diagonals of the shape x
# colour grid. At most 7 of the 8 diagonals are classes, so every shape and colour stays in the distractor pool.
MAX_CLASSES = len(SHAPES) * (len(COLOURS) - 1)
COLOUR_JITTER = 12          # each glyph's colour moves by up to this much per channel
GAP = 1                     # pixels between any two glyphs
MAX_GLYPH_COVER = 0.4       # glyphs (with their gaps) may cover at most this share of the image, so that ...
LAYOUT_TRIES = 20           # ... random placement finds room for all of them within this many tries
GREY_RANGE = (60.0, 170.0)  # background grey level
CLUTTER_CONTRAST = 60.0     # blob and line grey levels differ from the background by up to clutter x this
CLUTTER_BLOBS = 6           # blobs at clutter 1
CLUTTER_LINES = 8           # lines at clutter 1
LUMA_NOISE = 16.0           # std of the grey pixel noise at clutter 1
CHROMA_NOISE = 4.0          # std of the per-channel noise at clutter 1 (keeps the background grey)
SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


class Glyph(NamedTuple):
    """A glyph kind: one of :data:`SHAPES` in one of :data:`COLOURS`."""

    shape: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.shape}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass(frozen=True)
class ShapesConfig:
    """The generator's options (``nasx data shapes`` flags of the same names).

    The defaults train in a few minutes on two CPU cores and let a 95th-percentile activation box
    (about 5% of the image) match the 8x8 class glyph (6% of a 32x32 image).
    """

    classes: int = 6             # 2..MAX_CLASSES
    train_per_class: int = 200
    val_per_class: int = 50      # 0: no validation split
    test_per_class: int = 50
    image_size: int = 32         # side in pixels, a multiple of 4 (the network's two reductions)
    part_size: int = 8           # side of every glyph in pixels
    distractors: int = 3         # non-class glyphs per image
    clutter: float = 0.5         # background clutter, 0 (flat grey) .. 1
    seed: int = 0

    def validate(self) -> ShapesConfig:
        """``self``, or a ConfigError naming the first option out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            wanted, noun = ((int, float), "a number") if f.name == "clutter" else ((int,), "an integer")
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise ConfigError(f"shapes option {f.name} must be {noun}, got {value!r}")
        limits = [("classes", 2, MAX_CLASSES), ("train_per_class", 1, 99999), ("val_per_class", 0, 99999),
                  ("test_per_class", 1, 99999), ("image_size", 16, 512), ("part_size", 5, self.image_size // 2),
                  ("distractors", 0, 1000), ("clutter", 0, 1), ("seed", 0, 2**63 - 1)]
        for name, low, high in limits:
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"shapes option {name} must be in {low}..{high}, got {getattr(self, name)}")
        if self.image_size % 4:
            raise ConfigError(f"shapes option image_size must be a multiple of 4, got {self.image_size}")
        if (self.distractors + 1) * (self.part_size + GAP) ** 2 > MAX_GLYPH_COVER * self.image_size ** 2:
            raise ConfigError(f"{self.distractors + 1} glyphs of {self.part_size}x{self.part_size} pixels do not "
                              f"fit apart in a {self.image_size}x{self.image_size} image; lower --distractors or "
                              f"--part-size, or raise --image-size")
        return self

    def counts(self) -> dict[str, int]:
        """Images per class in each split that has any (val may have none)."""
        counts = {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}
        return {split: n for split, n in counts.items() if n}

    def class_glyphs(self) -> list[Glyph]:
        colours = list(COLOURS)
        n = len(SHAPES)
        return [Glyph(SHAPES[k % n], colours[(k % n + k // n) % n]) for k in range(self.classes)]

    def distractor_pool(self) -> list[Glyph]:
        """Every (shape, colour) pair that is no class's, shape by shape."""
        taken = set(self.class_glyphs())
        return [g for g in (Glyph(s, c) for s in SHAPES for c in COLOURS) if g not in taken]

    def command(self, out: str | Path) -> str:
        """The ``nasx data shapes`` command that writes this dataset to ``out`` (options that differ from the
        defaults only)."""
        default = ShapesConfig()
        flags = [f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in fields(self)
                 if getattr(self, f.name) != getattr(default, f.name)]
        return " ".join(["nasx data shapes", str(out), *flags])


@dataclass
class ShapesSplit:
    """One generated split of N images in class order.

    ``images`` uint8 (N, 3, S, S); ``labels`` int64 (N,); ``boxes`` int64 (N, 4) the class glyph's x0, y0, x1,
    y1 (exclusive); ``distractor_boxes`` int64 (N, D, 4) likewise; ``distractor_kinds`` int64 (N, D) indices
    into :meth:`ShapesConfig.distractor_pool`.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    distractor_boxes: np.ndarray
    distractor_kinds: np.ndarray


# ----------------------------------------------------------------------------------------- drawing

def glyph_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of ``shape``; every shape touches all four sides of the square."""
    centres = (np.arange(size) + 0.5) / size - 0.5          # pixel centres in (-0.5, 0.5)
    v, u = np.meshgrid(centres, centres, indexing="ij")      # v down the rows, u along the columns
    half = 0.5 / size                                        # half a pixel
    masks = {
        "triangle": lambda: np.abs(u) <= (v + 0.5) / 2 + half,          # apex up
        "circle": lambda: u ** 2 + v ** 2 <= 0.25,
        "square": lambda: np.ones((size, size), dtype=bool),
        "diamond": lambda: np.abs(u) + np.abs(v) <= 0.5 + half,
        "plus": lambda: (np.abs(u) <= 0.17) | (np.abs(v) <= 0.17),
        "cross": lambda: np.abs(np.abs(u) - np.abs(v)) <= 2.01 * half,  # an X, three pixels thick
        "frame": lambda: np.maximum(np.abs(u), np.abs(v)) >= 0.3,
        "bars": lambda: np.abs(u) >= 0.25,                               # two vertical bars
    }
    if shape not in masks:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return masks[shape]()


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """(size, size, 3) uint8 grey clutter: blobs, then lines, then noise."""
    grey = rng.uniform(*GREY_RANGE)
    canvas = Image.new("L", (size, size), round(grey))
    draw = ImageDraw.Draw(canvas)
    blobs, lines = round(CLUTTER_BLOBS * clutter), round(CLUTTER_LINES * clutter)
    shades = np.clip(np.round(grey + rng.uniform(-1, 1, blobs + lines) * CLUTTER_CONTRAST * clutter), 0, 255)
    for shade in shades[:blobs].tolist():
        x0, y0 = rng.uniform(-size / 8, size, 2)
        w, h = rng.uniform(3, size / 2, 2)
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=int(shade))
    for shade in shades[blobs:].tolist():
        draw.line(tuple(rng.uniform(-size / 4, size * 1.25, 4)), fill=int(shade), width=int(rng.integers(1, 3)))
    noise = (rng.normal(0, LUMA_NOISE * clutter, (size, size, 1))
             + rng.normal(0, CHROMA_NOISE * clutter, (size, size, 3)))
    return np.clip(np.asarray(canvas, dtype=np.float64)[:, :, None] + noise, 0, 255).round().astype(np.uint8)


def _layout(rng: np.random.Generator, size: int, part: int, count: int) -> np.ndarray | None:
    """(count, 2) top-left corners x, y of ``part`` x ``part`` glyphs, uniformly among the places GAP pixels or
    more from every glyph placed before; None when one did not fit."""
    span = size - part + 1
    free = np.ones((span, span), dtype=bool)                 # [y, x]: may a glyph start here?
    reach = part + GAP
    corners = np.empty((count, 2), dtype=np.int64)
    for i in range(count):
        ys, xs = np.nonzero(free)
        if not len(xs):
            return None
        j = rng.integers(len(xs))
        x, y = int(xs[j]), int(ys[j])
        free[max(0, y - reach + 1):y + reach, max(0, x - reach + 1):x + reach] = False
        corners[i] = x, y
    return corners


def _render(config: ShapesConfig, rng: np.random.Generator, glyph: Glyph, pool: list[Glyph],
            masks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image with ``glyph`` as its class glyph -> (image (3, S, S) uint8, corners (1 + D, 2) x, y of the
    class glyph then the distractors, distractor kinds (D,) indices into ``pool``)."""
    size, part = config.image_size, config.part_size
    image = _background(rng, size, config.clutter)
    for _ in range(LAYOUT_TRIES):
        corners = _layout(rng, size, part, 1 + config.distractors)
        if corners is not None:
            break
    else:
        raise ConfigError(f"could not place {config.distractors + 1} glyphs in a {size}x{size} image; "
                          f"lower --distractors or --part-size")
    kinds = rng.integers(len(pool), size=config.distractors)
    glyphs = [glyph] + [pool[i] for i in kinds]
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, (len(glyphs), 3))
    colours = np.clip(np.array([g.rgb for g in glyphs]) + jitter, 0, 255)
    for (x, y), g, colour in zip(corners.tolist(), glyphs, colours):
        image[y:y + part, x:x + part][masks[g.shape]] = colour
    return image.transpose(2, 0, 1), corners, kinds


def generate_split(config: ShapesConfig, split: str) -> ShapesSplit:
    """The ``split`` ("train", "val" or "test") images of ``config``, class by class."""
    config.validate()
    per_class = {"train": config.train_per_class, "val": config.val_per_class, "test": config.test_per_class}[split]
    glyphs, pool = config.class_glyphs(), config.distractor_pool()
    masks = {s: glyph_mask(s, config.part_size) for s in SHAPES}
    n, d, size, part = config.classes * per_class, config.distractors, config.image_size, config.part_size
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    corners = np.empty((n, 1 + d, 2), dtype=np.int64)
    kinds = np.empty((n, d), dtype=np.int64)
    labels = np.repeat(np.arange(config.classes, dtype=np.int64), per_class)
    for row, (k, i) in enumerate((k, i) for k in range(config.classes) for i in range(per_class)):
        rng = np.random.default_rng([config.seed, SPLIT_IDS[split], k, i])
        images[row], corners[row], kinds[row] = _render(config, rng, glyphs[k], pool, masks)
    boxes = np.concatenate([corners, corners + part], axis=2)          # (n, 1 + D, 4) x0, y0, x1, y1
    return ShapesSplit(images, labels, boxes[:, 0], boxes[:, 1:], kinds)


def generate(config: ShapesConfig) -> dict[str, ShapesSplit]:
    """Every split of ``config`` that has images (train, val unless val_per_class is 0, test)."""
    return {split: generate_split(config, split) for split in config.counts()}


# ----------------------------------------------------------------------------------------- in memory

def _manifest(config: ShapesConfig, source: str, classes: list[str], splits: dict[str, Split],
              problems: list[Problem] | None = None) -> Manifest:
    return Manifest(name="shapes", source=source, classes=classes, splits=splits, default_size=config.image_size,
                    problems=problems or [])


def shapes_manifest(config: ShapesConfig) -> Manifest:
    """The generated dataset of ``config`` as a manifest of in-memory pixels and part boxes."""
    splits = {name: Split(s.labels, pixels=s.images, boxes=s.boxes.astype(np.float32))
              for name, s in generate(config).items()}
    return _manifest(config, f"generated by nasxserve.data.shapes (seed {config.seed})",
                     [g.name for g in config.class_glyphs()], splits)


def _no_crop(crop: str) -> None:
    if crop != "none":
        raise DataError("shapes' boxes mark the class glyph, and cropping to them would leave nothing else in the "
                        "image; use data.crop: none (or --crop none)")


def _to_dataset(manifest: Manifest, image_size: int | None) -> Dataset:
    """Build the manifest's dataset, its boxes marked as part boxes."""
    return replace(build_dataset(manifest, image_size), part_boxes=True)


def generate_dataset(config: ShapesConfig | None = None, image_size: int | None = None) -> Dataset:
    """The dataset of ``config`` (the defaults when None), generated in memory; images resized to
    ``image_size`` when given (boxes follow)."""
    return _to_dataset(shapes_manifest((config or ShapesConfig()).validate()), image_size)


# ----------------------------------------------------------------------------------------- on disk

def write_shapes(config: ShapesConfig, out: str | Path, force: bool = False) -> Path:
    """Write the dataset of ``config`` to the folder ``out`` (layout in the module docstring); -> ``out``.

    Everything is written to a temporary folder next to ``out``, synced, and renamed into place, so ``out`` is
    either complete or untouched. An existing non-empty ``out`` is replaced only with ``force``, and only if it
    is a shapes dataset (it has a shapes.json)."""
    config.validate()
    out = Path(out).expanduser()
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_folder(out, "tmp")
    try:
        _write_folder(tmp, config)
        fsync_tree(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another output folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise DataError(f"{out} already exists and is not empty; pass --force to replace it, or choose another "
                        f"folder")
    if not (out / META).is_file():
        raise DataError(f"refusing to replace {out}: it is not a shapes dataset (it has no {META}); remove it "
                        f"yourself or choose another folder")


def _write_folder(root: Path, config: ShapesConfig) -> None:
    """Images, parts.csv and shapes.json of ``config`` under the (empty) folder ``root``."""
    glyphs = config.class_glyphs()
    rows = [HEADER]
    for split, data in generate(config).items():
        for g in glyphs:
            (root / split / g.name).mkdir(parents=True)
        per_class = config.counts()[split]
        for row, (image, label, box) in enumerate(zip(data.images, data.labels, data.boxes)):
            rel = f"{split}/{glyphs[label].name}/{row % per_class:05d}.png"
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            (root / rel).write_bytes(buffer.getvalue())
            rows.append([split, rel, str(int(label)), *(str(int(v)) for v in box)])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    (root / PARTS).write_text(text.getvalue(), encoding="utf-8")
    meta = {"format_version": FORMAT_VERSION, "dataset": "shapes", "options": asdict(config),
            "classes": [{"label": k, "name": g.name, "shape": g.shape, "colour": g.colour, "rgb": list(g.rgb)}
                        for k, g in enumerate(glyphs)],
            "distractor_pool": [g.name for g in config.distractor_pool()],
            "counts": {split: n * config.classes for split, n in config.counts().items()}}
    (root / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _read_meta(root: Path) -> tuple[ShapesConfig, list[str]]:
    """shapes.json -> (the generator options, class names in label order)."""
    path = root / META
    if not path.is_file():
        raise DataError(f"{root} has no {META}; {LAYOUT}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); write the dataset again with `nasx data shapes {root} "
                        f"--force`") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{path} has format version {version!r}; this nasx reads version {FORMAT_VERSION}: write "
                        f"the dataset again with `nasx data shapes {root} --force`")
    try:
        config = ShapesConfig(**meta["options"]).validate()
        names = [c["name"] for c in meta["classes"]]
    except (KeyError, TypeError, ConfigError) as e:
        raise DataError(f"{path} is damaged ({e}); write the dataset again with `nasx data shapes {root} "
                        f"--force`") from None
    if len(names) != config.classes or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path} is damaged: it lists {len(names)} class names for {config.classes} classes; "
                        f"write the dataset again with {config.command(root)} --force")
    return config, names


def _parse_row(row: list[str], root: Path, size: int, num_classes: int,
               where: str) -> tuple[str, Path, int, list[int]] | Problem:
    """One parts.csv row -> (split, image file, label, box), or the Problem it has."""
    if len(row) != len(HEADER):
        return Problem("bad-line", where, f"expected {len(HEADER)} fields ({','.join(HEADER)}), got {len(row)}")
    split, rel, label_text, *corners = row
    if split not in SPLITS:
        return Problem("bad-line", where, f"split {split!r} is not one of {', '.join(SPLITS)}")
    rel_path = PurePosixPath(rel)
    if not rel or rel_path.is_absolute() or ".." in rel_path.parts:
        return Problem("bad-line", where, f"path {rel!r} must be relative to the dataset folder, inside it")
    try:
        label, box = int(label_text), [int(v) for v in corners]
    except ValueError:
        return Problem("bad-line", where, "label, x0, y0, x1 and y1 must be integers")
    if not 0 <= label < num_classes:
        return Problem("bad-label", where, f"label {label} is outside 0..{num_classes - 1}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        return Problem("bad-box", where, f"box ({x0}, {y0}, {x1}, {y1}) is not a non-empty box inside the "
                                         f"{size}x{size} image")
    return split, root / rel_path, label, box


def _read_parts(root: Path, config: ShapesConfig, num_classes: int) -> tuple[dict[str, Split], list[Problem]]:
    """parts.csv -> the splits it lists (files, labels, boxes, in file order) and the problems of its rows."""
    path = root / PARTS
    if not path.is_file():
        raise DataError(f"{root} has no {PARTS}; write the dataset again with `{config.command(root)} --force`")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); write the dataset again with "
                        f"`{config.command(root)} --force`") from None
    reader = csv.reader(lines)
    header = next(reader, None)
    if header != HEADER:
        raise DataError(f"{path} must start with the header {','.join(HEADER)}, not {','.join(header or [])!r}; "
                        f"write the dataset again with `{config.command(root)} --force`")
    found: dict[str, tuple[list[Path], list[int], list[list[int]]]] = {s: ([], [], []) for s in SPLITS}
    problems = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        parsed = _parse_row(row, root, config.image_size, num_classes, f"{path}:{line_no}")
        if isinstance(parsed, Problem):
            problems.append(parsed)
            continue
        split, file, label, box = parsed
        files, labels, boxes = found[split]
        files.append(file)
        labels.append(label)
        boxes.append(box)
    splits = {split: Split(np.asarray(labels, dtype=np.int64), files=files,
                           boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
              for split, (files, labels, boxes) in found.items() if files or split != "val"}
    return splits, problems


def _read_folder(path: str) -> tuple[ShapesConfig, Manifest]:
    """The options and the manifest of the shapes folder at ``path``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"no shapes dataset at {root}: it does not exist; write one with `nasx data shapes {root}`")
    config, classes = _read_meta(root)
    splits, problems = _read_parts(root, config, len(classes))
    return config, _manifest(config, str(root.resolve()), classes, splits, problems)


def scan_shapes(path: str | None) -> Manifest:
    """The manifest of the shapes folder at ``path``, or of the default dataset generated in memory (None)."""
    return _read_folder(path)[1] if path else shapes_manifest(ShapesConfig())


def load_shapes(path: str | None, image_size: int | None = None, crop: str = "none") -> Dataset:
    """``--data shapes[:PATH]``: the folder at ``path``, or the default dataset generated in memory (None)."""
    _no_crop(crop)
    if not path:
        return _to_dataset(shapes_manifest(ShapesConfig()), image_size)
    if image_size is not None:
        check_image_size((image_size, image_size))
    config, manifest = _read_folder(path)
    try:
        return _to_dataset(manifest, image_size)
    except DataError as e:      # a damaged folder: it can always be written again from its options
        raise DataError(f"{e}; or write the dataset again with `{config.command(path)} --force`") from None
