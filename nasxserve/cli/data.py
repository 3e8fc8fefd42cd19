"""``nasx data inspect``: what a dataset loader sees, checked image by image, without training."""
from __future__ import annotations

import json
from typing import Optional

import typer

data_app = typer.Typer(
    help="Check datasets as the loaders see them: nasx data inspect NAME[:PATH] (digits, imagefolder, cifar10, "
         "cifar100, cub200, stanford-cars).",
    no_args_is_help=True,
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


@data_app.command("inspect", help=INSPECT_HELP)
def inspect(
    spec: str = typer.Argument(..., metavar="NAME[:PATH]",
                               help="The dataset as --data takes it, e.g. cub200:/data/CUB_200_2011 or "
                                    "cifar10:../shared/data/cifar10-mini."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Processes decoding images (default: the CPU count, at most 8)."),
) -> None:
    """Print the report of :func:`nasxserve.data.inspect.inspect_dataset`; exit 1 when it lists problems."""
    from rich.console import Console

    from nasxserve.data.inspect import inspect_dataset, render

    report = inspect_dataset(spec, workers)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console())
    if report["problems"]:
        raise typer.Exit(1)
