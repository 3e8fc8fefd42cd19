"""``nasx data inspect``: what a dataset loader sees, checked image by image, without training; ``nasx data
shapes``: write the synthetic shapes dataset with its ground-truth part boxes; ``nasx data samples``: a few
images of a split as PNG files, to try a model on."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

import typer

from nasxserve.cli.command import NasxCommand, NasxGroup

data_app = typer.Typer(
    help="Check a dataset as the loaders see it, or write the synthetic shapes dataset.\n\n"
         "nasx data inspect NAME[:PATH] checks a dataset (digits, imagefolder, cifar10, cifar100, cub200, "
         "stanford-cars, shapes); nasx data shapes OUT writes the shapes dataset, whose class is decided by one "
         "small part with a known box; nasx data samples writes a few images of a split as PNGs.",
    no_args_is_help=True,
    cls=NasxGroup,
)

INSPECT_HELP = (
    "Report what a dataset loader sees and every problem it would stop at, without training.\n\n"
    "Lists the classes, images per split and class, original image sizes, boxes and parts, and every problem: "
    "unreadable or missing files, labels out of range, images without a label, split or box (each image is "
    "decoded as training decodes it).\n\n"
    "Exit status: 0 no problems, 1 problems found (the report still prints), 2 unknown dataset or a PATH "
    "without the dataset's layout."
)

JSON_HELP = (
    "Print the report as JSON instead of tables. Keys: dataset, source, num_classes, classes (label order), "
    "splits {split: {images, per_class {class: count}}}, original_sizes (null or {images, width {min, median, "
    "max}, height {min, median, max}}, before crop/resize), stored_size (width, height) or null, mean and std "
    "(null when computed from the training images), boxes (bool), part_names (list), problems (a list of "
    "{kind, where, detail}) with kind one of: unreadable, missing-file, bad-label, no-label, no-split, no-box, "
    "bad-box, bad-line."
)


@data_app.command("inspect", cls=NasxCommand, help=INSPECT_HELP)
def inspect(
    spec: str = typer.Argument(..., metavar="NAME[:PATH]",
                               help="The dataset as --data takes it, e.g. digits, shapes:data/shapes or "
                                    "cub200:/data/CUB_200_2011."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Processes decoding images (default: the CPU count, at most 8)."),
) -> None:
    """Print the report of :func:`nasxserve.data.inspect.inspect_dataset`; exit 1 when it lists problems."""
    from nasxserve.cli.output import stdout_console
    from nasxserve.data.inspect import inspect_dataset, render

    report = inspect_dataset(spec, workers)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, stdout_console())
    if report["problems"]:
        raise typer.Exit(1)


SHAPES_HELP = (
    "Write the synthetic shapes dataset to the folder OUT, for --data shapes:OUT.\n\n"
    "Each image shows one class glyph (a shape in a colour, e.g. red-triangle: the class) at a random place, "
    "distractor glyphs (shape and colour pairs that are no class's, drawn from one pool shared by every class) "
    "and grey background clutter. The class glyph's box is the ground-truth part box, for checking where a "
    "prototype network's explanations point. The same options and seed always give the same images; "
    "--data shapes (no path) is the default "
    "options' dataset, generated in memory.\n\n"
    "Layout: OUT/shapes.json (format version, options, classes with their shape and colour, distractor pool), "
    "OUT/parts.csv (header split,path,label,x0,y0,x1,y1; path relative to OUT; box in pixels, x1 and y1 "
    "exclusive), OUT/{train,val,test}/<class>/NNNNN.png.\n\n"
    "OUT is written in a temporary folder beside it and renamed into place when complete. An existing non-empty "
    "OUT is only replaced with --force, and only if it is a shapes dataset."
)


@data_app.command("shapes", cls=NasxCommand, help=SHAPES_HELP)
def shapes(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write (created; see --force)."),
    classes: Optional[int] = typer.Option(None, "--classes",
                                          help="Classes, each a (shape, colour) pair: 2 to 56 (default: 6)."),
    train_per_class: Optional[int] = typer.Option(None, "--train-per-class",
                                                  help="Training images per class (default: 200)."),
    val_per_class: Optional[int] = typer.Option(None, "--val-per-class",
                                                help="Validation images per class; 0: no val split (default: 50)."),
    test_per_class: Optional[int] = typer.Option(None, "--test-per-class", help="Test images per class (default: 50)."),
    image_size: Optional[int] = typer.Option(None, "--image-size",
                                             help="Image side in pixels, a multiple of 4, 16 to 512 (default: 32)."),
    part_size: Optional[int] = typer.Option(None, "--part-size",
                                            help="Side of every glyph in pixels, 5 to half the image side; the class "
                                                 "glyph's share of the image is (part/image)^2 (default: 8, 6%)."),
    distractors: Optional[int] = typer.Option(None, "--distractors",
                                              help="Distractor glyphs per image; more make the task harder "
                                                   "(default: 3)."),
    clutter: Optional[float] = typer.Option(None, "--clutter",
                                            help="Background clutter from 0 (flat grey) to 1 (busiest): grey blobs, "
                                                 "lines and noise (default: 0.5)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Generator seed, >= 0 (default: 0)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already holds a shapes dataset."),
) -> None:
    """Write the dataset of :class:`nasxserve.data.shapes.ShapesConfig` (the flags given, else its defaults)."""
    from nasxserve.data.shapes import ShapesConfig, write_shapes

    given: dict[str, Any] = {"classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
             "test_per_class": test_per_class, "image_size": image_size, "part_size": part_size,
             "distractors": distractors, "clutter": clutter, "seed": seed}
    config = ShapesConfig(**{k: v for k, v in given.items() if v is not None}).validate()
    written = write_shapes(config, out, force)
    counts = ", ".join(f"{split} {n * config.classes}" for split, n in config.counts().items())
    print(f"wrote {config.classes} classes ({counts} images) to {written}; train on it with "
          f"nasx train --data shapes:{written}")


SAMPLES_HELP = (
    "Write a few images of a dataset's split as PNG files, to try nasx predict, explain and serve on.\n\n"
    "The images are written as the model sees them (the loader's colour mode and size), named "
    "SPLIT-INDEX-CLASS.png; the first --per-class images of each class in the split's order."
)


@data_app.command("samples", cls=NasxCommand, help=SAMPLES_HELP)
def samples(
    data: str = typer.Argument("digits", metavar="NAME[:PATH]", help="The dataset (default: digits, built in)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Folder to write the PNGs into (created)."),
    per_class: int = typer.Option(1, "--per-class", min=1, help="Images per class."),
    split: str = typer.Option("test", "--split", help="test, val or train."),
) -> None:
    from PIL import Image

    from nasxserve.data import load_dataset
    from nasxserve.errors import ConfigError
    from nasxserve.io import atomic_write_bytes

    if split not in ("test", "val", "train"):
        raise ConfigError(f"--split takes test, val or train; got {split!r}")
    dataset = load_dataset(data)
    images = getattr(dataset, split)
    if images is None:
        raise ConfigError(f"{dataset.name} has no {split} split; use --split test or train")
    labels = images.labels.numpy()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, name in enumerate(dataset.classes):
        for i in [int(i) for i in (labels == k).nonzero()[0][:per_class]]:
            pixels = images.images[i].numpy().transpose(1, 2, 0)
            picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            path = out / f"{split}-{i:05d}-{safe}.png"
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
            written.append(path)
    print(f"wrote {len(written)} {split} images of {dataset.name} to {out}/ (e.g. {written[0].name})")
