"""``nasx evaluate``: accuracy, the prototype set, faithfulness and localisation of a trained model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from nasxserve.cli import command as panels
from nasxserve.cli.output import print_text

console = Console(stderr=True)

HELP = "\n\n".join([
    "Measure what a trained model's explanations are worth, on its test split (or --split).",
    "Reports: top-1/top-5 accuracy of the prototype path and of the auxiliary head, and before/after the "
    "last projection as training measured it; the prototype set (per-class counts, duplicate pairs, mean "
    "nearest-neighbour distance, class purity of each prototype's k nearest training images); "
    "faithfulness (the deletion test: occluding the boxes of the prototypes that carry the prediction "
    "against occluding boxes of the same sizes at random, and the weight-randomisation sanity check); and "
    "localisation where the dataset has ground truth: the top prototype's box against the part box "
    "(shapes) or the annotated part locations (cub200, with Huang et al.'s consistency and stability).",
    "RUN_DIR is a finished run directory (nasx train --out), BUNDLE a bundle (nasx export --out).",
])


def evaluate(
    source: Path = typer.Argument(..., metavar="RUN_DIR|BUNDLE", help="A finished run directory or a bundle."),
    data: Optional[str] = typer.Option(None, "--data", rich_help_panel=panels.DATA,
                                       help="Dataset to evaluate on, NAME or NAME:PATH (default: the one the model "
                                            "was trained on)."),
    split: str = typer.Option("test", "--split", help="test, val or train.", rich_help_panel=panels.DATA),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of the split.",
                                        rich_help_panel=panels.DATA),
    out: Optional[Path] = typer.Option(None, "--out", "-o", rich_help_panel=panels.OUTPUT,
                                       help="Write the report as markdown to this file (an existing one is replaced)."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", rich_help_panel=panels.OUTPUT,
                                            help="Write the report as JSON to this file (an existing one is "
                                                 "replaced)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout.",
                                 rich_help_panel=panels.OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary on the terminal.",
                               rich_help_panel=panels.OUTPUT),
    purity_k: int = typer.Option(10, "--purity-k", min=1, rich_help_panel=panels.MEASURES,
                                 help="Training images per prototype for class purity (its k nearest)."),
    duplicate_rms: float = typer.Option(0.01, "--duplicate-threshold", min=0.0, rich_help_panel=panels.MEASURES,
                                        help="Two prototypes closer than this root-mean-square difference per "
                                             "channel count as a duplicate pair (as do two projected onto the "
                                             "same source patch)."),
    deletion_steps: int = typer.Option(5, "--deletion-steps", min=1, rich_help_panel=panels.MEASURES,
                                       help="Evidence boxes occluded one after another in the deletion test."),
    sanity_images: int = typer.Option(200, "--sanity-images", min=1, rich_help_panel=panels.MEASURES,
                                      help="Images for the weight-randomisation check."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random boxes, noise and re-initialised weights.",
                             rich_help_panel=panels.MEASURES),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N].", rich_help_panel=panels.HARDWARE),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass.",
                                   rich_help_panel=panels.HARDWARE),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1, rich_help_panel=panels.HARDWARE,
                                          help="CPU threads for PyTorch's kernels (default: 1 on the CPU, as nasx "
                                               "train: an evaluation beside other work slows down by no more than "
                                               "its share, and its figures are the same on every machine)."),
) -> None:
    import torch

    from nasxserve.data import load_dataset
    from nasxserve.errors import ConfigError
    from nasxserve.explain.evaluation import (EvaluationOptions, evaluate_model, load_evaluated, render_markdown,
                                              write_outputs)
    from nasxserve.training.context import cpu_threads, resolve_device

    if split not in ("test", "val", "train"):
        raise ConfigError(f"--split must be test, val or train, got {split!r}")
    ev = load_evaluated(source)
    spec = data or ev.data.spec or "digits"
    # a run without data.val_share was trained before held-out validation splits: it had none (its default)
    dataset = load_dataset(spec, ev.data.image_size, ev.data.crop, ev.data.val_share)
    options = EvaluationOptions(split=split, batch_size=batch_size, purity_k=purity_k, duplicate_rms=duplicate_rms,
                                deletion_steps=deletion_steps, sanity_images=sanity_images, limit=limit, seed=seed)
    on = resolve_device(device)
    torch.set_num_threads(cpu_threads(threads, on))
    with console.status("evaluating", spinner="dots") as status:
        result = evaluate_model(ev, dataset, options, on, same_data=data is None
                                or data == ev.data.spec,
                                progress=lambda step: None if quiet else status.update(step))
    write_outputs(result, json_out, out)
    if as_json:
        print(json.dumps(result, indent=2))
    elif not quiet:
        print_text(render_markdown(result))
