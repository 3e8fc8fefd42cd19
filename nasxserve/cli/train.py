"""``nasx train`` and ``nasx search``."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from nasxserve.cli import command as panels
from nasxserve.cli.output import stdout_console
from nasxserve.data import DATASETS
from nasxserve.errors import ConfigError
from nasxserve.explain.verdicts import run_verdicts

if TYPE_CHECKING:
    from nasxserve.nas.genotype import Genotype
    from nasxserve.training.rundir import RunDir

# soft wrap: a long line (a genotype, a resume command) stays one line to copy, in a terminal and in a log
console = Console(stderr=True, soft_wrap=True)

DATA_HELP = (f"Dataset: NAME or NAME:PATH; NAME is one of {', '.join(DATASETS)}, "
             "e.g. shapes, cifar10:/data/cifar-10-batches-py or imagefolder:PATH (check one first with nasx "
             "data inspect NAME:PATH).")
OUT_HELP = "Run directory to create (default: runs/<data>-<date>-<time>)."


def _split_epochs(text: str, n: int, option: str) -> list[int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} takes {n} comma-separated integers, got {text!r}") from None
    if len(parts) != n or any(p < 0 for p in parts):
        raise ConfigError(f"{option} takes {n} comma-separated non-negative integers, got {text!r}")
    return parts


def split_search_epochs(total: int) -> str:
    """N search epochs as adaptation / joint / fine-tune = 1/4, 1/2, 1/4 (at least one joint epoch)."""
    a = f = total // 4
    return f"{a},{max(total - a - f, 1)},{f}"


def split_retrain_epochs(total: int) -> str:
    """N retrain epochs as joint / fine-tune = 70% / 30%."""
    f = round(total * 0.3)
    return f"{total - f},{f}"


def split_protopnet_epochs(total: int) -> dict[str, int]:
    """N ProtoPNet epochs as warm-up / joint: a tenth (at least one) warm-up, the rest joint."""
    warm = max(1, total // 10)
    return {"epochs_warm": warm, "epochs_joint": total - warm}


def _overrides(data: Optional[str], device: Optional[str], seed: Optional[int], genotype: Optional[str],
               order: Optional[int], search_epochs: Optional[str], retrain_epochs: Optional[str],
               threads: Optional[int], strategy: Optional[str] = None,
               lease: Optional[bool] = None, audience: Optional[str] = None,
               head: Optional[str] = None, preset: Optional[str] = None,
               precision: Optional[str] = None, method: Optional[str] = None, backbone: Optional[str] = None,
               backbone_weights: Optional[Path] = None, epochs: Optional[int] = None,
               extension: Optional[str] = None, deletion_cost: Optional[float] = None,
               box_calibration: Optional[bool] = None) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if preset is not None:
        o["preset"] = preset
    if precision is not None:
        o["precision"] = precision
    protopnet: dict[str, Any] = {}
    if backbone is not None:
        protopnet["backbone"] = backbone
    if backbone_weights is not None:
        protopnet["backbone_weights"] = str(backbone_weights.expanduser().resolve())
    if protopnet and method is None:
        method = "protopnet"       # --backbone and --backbone-weights only mean something for ProtoPNet
    if epochs is not None:         # whichever method runs takes its own share of the same budget
        protopnet.update(split_protopnet_epochs(epochs))
    if protopnet:
        o["protopnet"] = protopnet
    if method is not None:
        o["method"] = method
    search: dict[str, Any] = {}
    if strategy is not None:
        search["strategy"] = strategy
    if lease is not None or audience is not None:
        search["lease"] = {"enabled": True if lease is None else lease}
        if audience is not None:
            search["lease"]["audience"] = audience
    if head == "linear":           # the black box: a plain search (if any) and the linear head retrained
        search["head"] = "plain"
        o["retrain"] = {"head": "linear"}
    elif head is not None:
        search["head"] = head
    if search:
        o["search"] = search
    if data is not None:
        o.setdefault("data", {})["spec"] = data
    if device is not None:
        o["device"] = device
    if seed is not None:
        o["seed"] = seed
    if genotype is not None:
        o["genotype"] = genotype
    if threads is not None:
        o["threads"] = threads
    if order is not None:
        o.setdefault("search", {})["order"] = order
    if search_epochs is not None:
        a, j, f = _split_epochs(search_epochs, 3, "--search-epochs")
        o.setdefault("search", {}).update(epochs_adapt=a, epochs_joint=j, epochs_finetune=f)
    if retrain_epochs is not None:
        j, f = _split_epochs(retrain_epochs, 2, "--retrain-epochs")
        o.setdefault("retrain", {}).update(epochs_joint=j, epochs_finetune=f)
    o.update(_extension_overrides(extension, deletion_cost, box_calibration))
    return o


def _extension_overrides(names: Optional[str], deletion_cost: Optional[float],
                         box_calibration: Optional[bool]) -> dict[str, Any]:
    """The extensions section of ``--extension a,b`` and ``--deletion-cost``."""
    if box_calibration is not None:
        raise typer.BadParameter("box calibration is now named with the other extensions: --extension "
                                 "box-calibration (leave it out for the papers' method)",
                                 param_hint="--box-calibration")
    enabled = [n.strip() for n in names.split(",") if n.strip()] if names is not None else None
    if deletion_cost is not None and "deletion-cost" not in (enabled or []):
        raise typer.BadParameter("it is the weight of the deletion-cost extension: add --extension deletion-cost",
                                 param_hint="--deletion-cost")
    section: dict[str, Any] = {}
    if enabled is not None:
        section["enabled"] = enabled
    if deletion_cost is not None:
        section["deletion_cost"] = deletion_cost
    return {"extensions": section} if section else {}


class RichReporter:
    """Progress bars per epoch and a line per finished epoch, with the time the phase has left; nothing when
    quiet.

    Written to a file or a pipe (a cluster job's log), the bars are left out and each epoch stays on one
    line whatever its length, so the log reads and greps like the terminal does; a long epoch adds a line
    every ``LOG_EVERY_S`` seconds on where it is, so a log never looks hung.
    """

    LOG_EVERY_S = 60.0

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.total_epochs = 0
        self.loss = self.acc = 0.0
        self.n = 0
        self.batches = 0
        self.label = ""
        self.phase_started = self.epoch_started = self.last_line = time.monotonic()
        self.done = 0                      # epochs finished in this phase by this process (a resume starts anew)

    def phase(self, name: str, epochs: int) -> None:
        self.total_epochs = epochs
        self.phase_started = time.monotonic()
        self.done = 0
        if not self.quiet:
            console.rule(f"[bold]{name}[/bold] ({epochs} epochs)")

    def epoch_start(self, phase: str, epoch: int, stage, batches: int) -> None:
        self.loss = self.acc = 0.0
        self.n = 0
        self.batches = batches
        self.label = f"{phase} {stage.value:<8} epoch {epoch + 1}/{self.total_epochs}"
        self.epoch_started = self.last_line = time.monotonic()
        if self.quiet or not console.is_terminal:
            return
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=batches, loss=0.0, acc=0.0)

    def batch(self, loss: float, acc: float) -> None:
        self.n += 1
        self.loss += (loss - self.loss) / self.n
        self.acc += (acc - self.acc) / self.n
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, loss=self.loss, acc=self.acc)
        elif not self.quiet and time.monotonic() - self.last_line >= self.LOG_EVERY_S:
            self.last_line = time.monotonic()
            per_batch = (self.last_line - self.epoch_started) / self.n
            console.print(f"  {self.label}: batch {self.n}/{self.batches}, loss {self.loss:.3f} acc {self.acc:.3f}, "
                          f"{_duration(per_batch * (self.batches - self.n))} left in the epoch", markup=False,
                          highlight=False)

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.stop()
        if self.quiet:
            return
        aux = f" aux {row['val_aux_acc']:.3f}" if row.get("val_aux_acc") is not None else ""
        # waiting for data only deserves a mention when it costs something
        wait = f" data wait {row['data_wait_share']:.0%}" if row.get("data_wait_share", 0) >= 0.05 else ""
        self.done += 1
        left = self.total_epochs - row["epoch"]
        eta = (f", ~{_duration((time.monotonic() - self.phase_started) / self.done * left)} left in the "
               f"{row['phase']}" if left > 0 else "")
        console.print(f"{row['phase']} {row['stage']:<8} {row['epoch']:>3}/{self.total_epochs} "
                      f"loss {row['train_loss']:.3f} train acc {row['train_acc']:.3f} "
                      f"val acc {row['val_acc']:.3f}{aux}{wait} [{row['elapsed_s']:.0f}s{eta}]")

    def message(self, text: str) -> None:
        if not self.quiet:
            console.print(f"[cyan]{text}[/cyan]")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _default_out(spec: str) -> str:
    name = spec.split(":", 1)[0] or "run"
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _print_config(config: Optional[Path], resume: Optional[Path], overrides: dict[str, Any]) -> None:
    """``--print-config``: the resolved configuration (defaults, then the preset, the --config file and the
    flags) as the YAML a run saves to config.yaml, on stdout; nothing is trained or written."""
    from nasxserve.training.config_loading import load_config

    if resume is not None:
        raise ConfigError(f"--print-config shows the config a new run would use; a run continues with its own "
                          f"saved one, {resume / 'config.yaml'}")
    sys.stdout.write(load_config(config, overrides).to_yaml())


def _run_command(action: str, config: Optional[Path], out: Optional[Path], resume: Optional[Path], quiet: bool,
                 overrides: dict[str, Any]):
    """Make (or resume) the run and call ``Trainer.<action>``; returns (trainer, result).
    Ctrl-C prints how to continue and exits 130. Under torchrun every process runs this, in the process
    group it joins here; rank 0 alone shows progress and messages."""
    from nasxserve.training import distributed

    world = distributed.init_from_environment()
    completed = False
    try:
        result = _run_trainer(action, config, out, resume, RichReporter(quiet or not world.is_main), overrides)
        completed = True
        return result
    finally:
        distributed.shutdown(completed)


def _run_trainer(action: str, config: Optional[Path], out: Optional[Path], resume: Optional[Path],
                 reporter: RichReporter, overrides: dict[str, Any]):
    from nasxserve.training.config_loading import load_config
    from nasxserve.training.trainer import Trainer

    if resume is not None:
        if (overrides or config is not None) and not reporter.quiet:
            console.print("[yellow]--resume continues with the run's saved config.yaml; other options are "
                          "ignored[/yellow]")
        root = Path(resume)
    else:
        cfg = load_config(config, overrides)
        if action == "search" and cfg.method == "protopnet":   # before a run directory is made for nothing
            raise ConfigError("ProtoPNet has a fixed backbone: there is no architecture to search. Train it with "
                              "nasx train --method protopnet")
        root = Path(out) if out is not None else Path(_default_out(cfg.data.spec))
    trainer = None
    try:
        # an interrupt may come while the run folder is being made: once its config is written, it resumes
        trainer = (Trainer.resume(str(root), reporter=reporter) if resume is not None
                   else Trainer.fresh(cfg, str(root), reporter=reporter))
        if not reporter.quiet:
            console.print(f"run folder: {trainer.ctx.run.root}", markup=False, highlight=False, soft_wrap=True)
        return trainer, getattr(trainer, action)()
    except KeyboardInterrupt:
        reporter.stop()
        resumable = trainer.ctx.run.root if trainer is not None else root if (root / "config.yaml").is_file() else None
        if resumable is not None and (trainer is None or trainer.ctx.world.is_main):
            console.print(f"[yellow]interrupted; continue with: nasx {action} --resume {resumable}[/yellow]")
        sys.exit(130)
    finally:
        reporter.stop()


SHOWN_CLASS_COUNTS = 12     # above this many classes the summary gives the spread, report.json every count
SHOWN_EMPTY_CLASSES = 10


def _prototype_rows(counts: dict[str, int], distinct: int | None) -> list[tuple[str, str | Text]]:
    """The summary's rows on where the last projection left the prototypes: how they spread over the
    classes, which classes it left without one (their score then has no positive evidence), and how many
    distinct training patches they sit on (the global projection can put several on one patch)."""
    values = sorted(counts.values())
    if len(values) <= SHOWN_CLASS_COUNTS:
        rows: list[tuple[str, str | Text]] = [("prototypes per class", json.dumps(counts))]
    else:
        rows = [("prototypes per class",
                 f"min {values[0]}, median {statistics.median(values):g}, max {values[-1]} over {len(values)} classes")]
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        names = ", ".join(empty[:SHOWN_EMPTY_CLASSES]) + (", ..." if len(empty) > SHOWN_EMPTY_CLASSES else "")
        note = f"{len(empty)} of {len(counts)}: {names} (--extension class-projection keeps every class its own)"
        rows.append(("classes without a prototype", Text(note, style="yellow")))
    if distinct is not None:
        rows.append(("distinct source patches", f"{distinct} of {sum(counts.values())} prototypes"))
    return rows


def _calibration_row(report: dict[str, Any]) -> str:
    """How far the last projection's box calibration moved the prototypes' boxes."""
    c = report["retrain_projections"][-1]["box_calibration"]
    return (f"{c['prototypes_moved']} of {report['num_prototypes']} prototypes' boxes moved, median "
            f"{c['median_shift_px']:g} px, at most {c['max_shift_px']} px")


def _normal_cell_row(genotype: Genotype, search: dict[str, Any] | None) -> Text | None:
    """A collapsed normal cell, or one whose convolutions the ``search.min_convolutions`` rule added; None when
    the search chose its convolutions itself."""
    convs, edges = genotype.parametric("normal"), len(genotype.normal)
    if genotype.collapsed():
        return Text(f"collapsed: {convs} convolution(s) of {edges} edges", style="yellow")
    searched = (search or {}).get("convolutions_searched")
    if searched is not None and searched < convs:
        return Text(f"{convs} convolutions of {edges} edges: the search chose {searched}, search.min_convolutions "
                    "added the rest (see docs/method.md#collapse)")
    return None


def _print_report(report: dict[str, Any], run: RunDir) -> None:
    distinct = _distinct_patches(run.records_path)
    t = report["test"]
    table = Table(show_header=False)
    if report.get("head") == "linear":
        table.add_row("test accuracy, linear head (black box)", f"{t['acc']:.4f}")
    else:
        table.add_row("test accuracy, prototype path", f"{t['prototype_acc']:.4f}")
        table.add_row("  just before the last projection", f"{t['prototype_acc_before_projection']:.4f}")
        table.add_row("  just after the last projection", f"{t['prototype_acc_after_projection']:.4f}")
        if t.get("prototype_acc_after_last_layer") is not None:
            table.add_row("  after the last-layer fit (the final model)", f"{t['prototype_acc_after_last_layer']:.4f}")
        if t["aux_acc"] is not None:
            table.add_row("test accuracy, auxiliary head", f"{t['aux_acc']:.4f}")
        for label, value in _prototype_rows(report["prototype_class_counts"], distinct):
            table.add_row(label, value)
        if report.get("mislabelled_prototypes"):
            table.add_row("prototypes supporting another class", Text(
                f"{len(report['mislabelled_prototypes'])}: their largest last-layer weight is not to their own class; "
                f"nasx export refuses the run", style="red"))
        extensions = report.get("extensions") or {}
        if "deletion_cost" in extensions:
            table.add_row("deletion cost (not in the papers)", f"lambda {extensions['deletion_cost']:g}")
        if "box_calibration" in extensions:
            table.add_row("box calibration (not in the papers)", _calibration_row(report))
    if report.get("method") == "protopnet":
        table.add_row("backbone", f"{report['backbone']}, weights: {report['backbone_weights']}")
    else:
        table.add_row("genotype source", report["genotype_source"])
        from nasxserve.nas.genotype import Genotype
        genotype = Genotype.from_dict(report["genotype"])
        row = _normal_cell_row(genotype, report.get("search"))
        if row is not None:
            table.add_row("normal cell", row)
    table.add_row("parameters of the prediction", f"{report['params']:,}")
    table.add_row("wall time", f"{report['wall_time_s']:.0f} s")
    screen = stdout_console()
    screen.print(Text(f"nasx run {run.root}"), soft_wrap=True)      # a line keeps the path whole, a title wraps it
    screen.print(table)
    for line in _verdict_lines(report, run.root, distinct):
        screen.print(line, soft_wrap=True)


def _verdict_lines(report: dict[str, Any], root: Path, distinct: int | None) -> list[Text]:
    """The poor verdicts of the run in ``root`` (explain.verdicts), one line each with its docs pointer, and where
    the measures that need a pass over the test split come from; ``distinct``: its prototypes' distinct source
    patches (None: unknown)."""
    convolutions = edges = None
    if report.get("method") != "protopnet":
        from nasxserve.nas.genotype import Genotype
        genotype = Genotype.from_dict(report["genotype"])
        convolutions, edges = genotype.parametric("normal"), len(genotype.normal)
    poor = run_verdicts(report, distinct, convolutions, edges or 0)
    lines = [Text(f"poor: {v['measure']}: {v['says']} (see {v['see']})", style="yellow") for v in poor]
    if report.get("head") != "linear":
        lines.append(Text(f"the deletion gap, the alignment and the own-class share of the evidence: nasx evaluate "
                          f"{root}"))
    return lines


def _distinct_patches(records_path: Path) -> int | None:
    """How many distinct training patches the prototypes were projected onto; None without records."""
    if not records_path.is_file():
        return None
    records = json.loads(records_path.read_text(encoding="utf-8"))["records"]
    return len({(r["sample"], tuple(r["position"])) for r in records})


# Options both commands take; Typer reads each OptionInfo afresh for every command that uses it. Each has
# its help panel; the signatures list the panels' options together, the most-used panels first.
DATA = typer.Option(None, "--data", help=DATA_HELP + " (default: digits)", rich_help_panel=panels.DATA)
PRESET = typer.Option(None, "--preset", rich_help_panel=panels.DATA,
                      help="Settings for the dataset: cpu (finishes on a laptop) or paper (the papers' search and "
                           "retrain settings: C=16, 8 cells, 50 epochs, second order, projections every 10 epochs, "
                           "DARTS-ADA every 2; then 20 cells, C=36, 600 epochs; 128-channel prototypes) "
                           "(default: cpu). A --config file and other flags override it; --print-config shows "
                           "the result.")
CONFIG = typer.Option(None, "--config", help="YAML file with config overrides.", rich_help_panel=panels.DATA)
PRINT_CONFIG = typer.Option(False, "--print-config", rich_help_panel=panels.DATA,
                            help="Print the resolved config (defaults, then --preset, --config and the other "
                                 "options) as YAML and exit without training, e.g. nasx train --preset paper "
                                 "--data cifar10:PATH --print-config.")
OUT = typer.Option(None, "--out", "-o", help=OUT_HELP, rich_help_panel=panels.RUN)
SEED = typer.Option(None, "--seed", help="Random seed (default: 0).", rich_help_panel=panels.RUN)
SEARCH_EPOCHS = typer.Option(None, "--search-epochs", metavar="A,J,F", rich_help_panel=panels.SCHEDULE,
                             help="Search epochs per stage: adaptation, joint, fine-tune.")
STRATEGY = typer.Option(None, "--strategy", rich_help_panel=panels.SEARCH,
                        help="Search strategy: darts (stabilised by default), pc-darts, p-darts, or lease "
                             "(= darts --lease) (default: darts).")
ORDER = typer.Option(None, "--order", rich_help_panel=panels.SEARCH,
                     help="Architecture gradient: 1 (first order) or 2 (second order, eq. 2) (default: 1).")
LEASE = typer.Option(None, "--lease/--no-lease", rich_help_panel=panels.SEARCH,
                     help="LeaSE on top of the strategy: the search network explains itself to an audience "
                          "network and alpha also learns from the audience's validation loss.")
AUDIENCE = typer.Option(None, "--audience", rich_help_panel=panels.SEARCH,
                        help="LeaSE audience: resnet18, resnet50 or any torchvision classifier (implies --lease; "
                             "default: resnet18).")
HEAD_HELP = ("prototype: search with the NASXNet stages; plain: search with a plain classifier head (stage 1's "
             "loss every epoch), both retrained with prototypes; linear: the black box, a plain search and the "
             "network retrained with global pooling + a linear classifier, no prototypes (default: prototype).")
DEVICE = typer.Option(None, "--device", help="auto, cpu or cuda[:N] (default: auto).", rich_help_panel=panels.HARDWARE)
PRECISION = typer.Option(None, "--precision", rich_help_panel=panels.HARDWARE,
                         help="auto (bf16 on CUDA, fp16 where the GPU lacks bf16, fp32 on CPU), fp32, bf16 or fp16 "
                              "(default: auto).")
THREADS = typer.Option(None, "--threads", metavar="N", min=1,
                       help="CPU threads for PyTorch's kernels (default: 1 when training on the CPU, so that runs "
                            "sharing the cores slow down by no more than their share and a run's numbers are the "
                            "same on every machine; one per core beside a GPU). More threads speed up larger "
                            "networks (32x32 images and up) on a CPU of their own; give the same N to reproduce a "
                            "run exactly.",
                       rich_help_panel=panels.HARDWARE)


def train(
    data: Optional[str] = DATA,
    preset: Optional[str] = PRESET,
    config: Optional[Path] = CONFIG,
    print_config: bool = PRINT_CONFIG,
    out: Optional[Path] = OUT,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory.",
                                          rich_help_panel=panels.RUN),
    seed: Optional[int] = SEED,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output; print the report JSON.",
                               rich_help_panel=panels.RUN),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, rich_help_panel=panels.SCHEDULE,
                                         help="Training epochs in all: NASXNet's retrain split 70% joint / 30% "
                                              "fine-tune (--retrain-epochs sets them exactly); ProtoPNet's split a "
                                              "tenth (at least one) warm-up, the rest joint."),
    retrain_epochs: Optional[str] = typer.Option(None, "--retrain-epochs", metavar="J,F",
                                                 rich_help_panel=panels.SCHEDULE,
                                                 help="Retrain epochs per stage: joint, fine-tune."),
    search_epochs: Optional[str] = SEARCH_EPOCHS,
    method: Optional[str] = typer.Option(None, "--method", rich_help_panel=panels.METHOD,
                                         help="nasxnet: search and retrain (default); protopnet: the ProtoPNet "
                                              "baseline (Chen et al., 2019) on a fixed torchvision backbone, no "
                                              "search: warm-up, joint epochs, class-specific pushes with last-layer "
                                              "optimisation."),
    head: Optional[str] = typer.Option(None, "--head", help=HEAD_HELP, rich_help_panel=panels.METHOD),
    genotype: Optional[str] = typer.Option(None, "--genotype", rich_help_panel=panels.METHOD,
                                           help="Skip the search: a published genotype (DARTS_V1, DARTS_V2, "
                                                "PC_DARTS, PDARTS), a run directory whose search finished, a "
                                                "genotype file (JSON or DARTS string) or the Genotype(...) string "
                                                "nasx search prints."),
    backbone: Optional[str] = typer.Option(None, "--backbone", rich_help_panel=panels.METHOD,
                                           help="ProtoPNet's backbone: a torchvision ResNet, VGG, DenseNet, "
                                                "EfficientNet, MobileNet or ConvNeXt name (implies --method "
                                                "protopnet; default: resnet18). ResNets get a 3x3 stride-1 stem "
                                                "without max-pool for images under 64 pixels."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", rich_help_panel=panels.METHOD,
                                                    help="A torchvision state_dict file of the backbone (e.g. its "
                                                         "ImageNet weights, saved with torch.save(model.state_dict(), "
                                                         "PATH); nothing is downloaded). Without it the backbone "
                                                         "trains from scratch (implies --method protopnet)."),
    extension: Optional[str] = typer.Option(None, "--extension", metavar="NAME[,NAME]", rich_help_panel=panels.BOXES,
                                            help="Add this project's extensions, which are in neither paper (default: "
                                                 "none, the papers' method). deletion-cost: the retraining's "
                                                 "prototype stages also make the evidence of each image's top "
                                                 "prototype vanish when its box is occluded, so boxes cover what the "
                                                 "prototype sees (one more forward and backward pass per batch). "
                                                 "box-calibration: after each retrain projection, each prototype's "
                                                 "boxes are moved onto the input evidence its similarity rests on, "
                                                 "measured on the training images, in the run, the bundle, nasx "
                                                 "explain and the server (one backward pass over the training split "
                                                 "per projection). foreground-projection: every projection takes "
                                                 "only patches on the object, never empty background (data on a "
                                                 "dark background, like digits, or with object boxes, like shapes "
                                                 "and cub200). class-projection: every projection keeps each "
                                                 "prototype within its own class's images (ProtoPNet's push), so no "
                                                 "projection can give one class every prototype. "
                                                 "docs/method.md#extensions says more."),
    deletion_cost: Optional[float] = typer.Option(None, "--deletion-cost", metavar="LAMBDA",
                                                  rich_help_panel=panels.BOXES,
                                                  help="The weight of the deletion-cost extension (default: 2); "
                                                       "needs --extension deletion-cost."),
    box_calibration: Optional[bool] = typer.Option(None, "--box-calibration/--no-box-calibration", hidden=True,
                                                   rich_help_panel=panels.BOXES),   # only to say what replaced it
    strategy: Optional[str] = STRATEGY,
    order: Optional[int] = ORDER,
    lease: Optional[bool] = LEASE,
    audience: Optional[str] = AUDIENCE,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    threads: Optional[int] = THREADS,
) -> None:
    """Search an architecture, then retrain it with prototypes.

    Or train a baseline: the black box (--head linear) or ProtoPNet (--method protopnet). With no options:
    the CPU preset on digits.
    """
    if epochs is not None and retrain_epochs is None:
        retrain_epochs = split_retrain_epochs(epochs)
    overrides = _overrides(data, device, seed, genotype, order, search_epochs, retrain_epochs, threads,
                           strategy, lease, audience, head, preset, precision, method, backbone, backbone_weights,
                           epochs, extension, deletion_cost, box_calibration)
    if print_config:
        return _print_config(config, resume, overrides)
    trainer, report = _run_command("train", config, out, resume, quiet, overrides)
    if not trainer.ctx.world.is_main:
        return
    if quiet:
        print(json.dumps(report["test"]))
    else:
        _print_report(report, trainer.ctx.run)
        console.print(f"report: {trainer.ctx.run.report_path}")


def search(
    data: Optional[str] = DATA,
    preset: Optional[str] = PRESET,
    config: Optional[Path] = CONFIG,
    print_config: bool = PRINT_CONFIG,
    out: Optional[Path] = OUT,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted search.",
                                          rich_help_panel=panels.RUN),
    seed: Optional[int] = SEED,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output; print the genotype JSON.",
                               rich_help_panel=panels.RUN),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, rich_help_panel=panels.SCHEDULE,
                                         help="Search epochs in all, split 1/4 adaptation, 1/2 joint, 1/4 "
                                              "fine-tune (--search-epochs sets them exactly)."),
    search_epochs: Optional[str] = SEARCH_EPOCHS,
    strategy: Optional[str] = STRATEGY,
    head: Optional[str] = typer.Option(None, "--head", help=HEAD_HELP, rich_help_panel=panels.SEARCH),
    order: Optional[int] = ORDER,
    lease: Optional[bool] = LEASE,
    audience: Optional[str] = AUDIENCE,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    threads: Optional[int] = THREADS,
) -> None:
    """Run the architecture search only and write genotype.json.

    The NASXNet stages under the chosen strategy; nasx train --genotype RUN_DIR then retrains the result.
    """
    if epochs is not None and search_epochs is None:
        search_epochs = split_search_epochs(epochs)
    overrides = _overrides(data, device, seed, None, order, search_epochs, None, threads, strategy, lease,
                           audience, head, preset, precision)
    if print_config:
        return _print_config(config, resume, overrides)
    trainer, genotype = _run_command("search", config, out, resume, quiet, overrides)
    if not trainer.ctx.world.is_main:
        return
    if quiet:
        print(genotype.to_json())
    else:
        console.print(f"genotype: {genotype.to_darts_string()}")
        console.print(f"written to {trainer.ctx.run.genotype_path}")
