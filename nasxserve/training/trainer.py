"""NASXNet training: the three-stage search (section 3.2, :mod:`nasxserve.training.search`), then retraining the
derived network (:mod:`nasxserve.training.retrain`), in one run directory (:mod:`nasxserve.training.context`).

``method: protopnet`` runs the ProtoPNet baseline instead (:mod:`nasxserve.training.protopnet`), on the same
run context: run directory, checkpoints, seeding and evaluation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import yaml

from nasxserve.errors import RunDirError
from nasxserve.nas.genotype import Genotype, load_genotype
from nasxserve.training.config import TrainConfig
from nasxserve.training.config_loading import config_from_dict
from nasxserve.training.context import RETRAIN, Reporter, RunContext
from nasxserve.training.distributed import World, current_world
from nasxserve.training.projection import Projector
from nasxserve.training.protopnet import ProtoPNetTrainer
from nasxserve.training.retrain import RetrainPhase
from nasxserve.training.rundir import ReplicaRunDir, RunDir
from nasxserve.training.search import SearchPhase, search_summary


class Training(Protocol):
    """What :meth:`Trainer.fresh` and :meth:`Trainer.resume` return: a method's trainer for one run."""

    ctx: RunContext

    def search(self) -> Genotype: ...

    def train(self) -> dict[str, Any]: ...


def _run_dir(out: str, world: World) -> RunDir:
    """The run directory as this process sees it: rank 0 writes it, the other ranks only read it."""
    return RunDir(out) if world.is_main else ReplicaRunDir(out)


def _trainer_class(cfg: TrainConfig) -> type[Trainer] | type[ProtoPNetTrainer]:
    return ProtoPNetTrainer if cfg.method == "protopnet" else Trainer


class Trainer:
    """Runs search and/or retraining for one run directory; see :class:`RunContext` for the arguments.

    Under torchrun (an initialised process group) it trains data-parallel; ``run_dir`` is then a
    :class:`ReplicaRunDir` on every rank but 0.
    """

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, reporter: Reporter | None = None,
                 on_epoch_end: Callable[[str, int], None] | None = None):
        self.ctx = RunContext(cfg, run_dir, reporter, on_epoch_end)

    @staticmethod
    def fresh(cfg: TrainConfig, out: str, **kw) -> Training:
        """A new run directory ``out`` for ``cfg``, with the trainer of its method."""
        world = current_world()
        run = _run_dir(world.broadcast_object(out), world)   # rank 0's name, e.g. a time-stamped default
        if cfg.genotype:
            load_genotype(cfg.genotype)  # a bad genotype fails before anything is written
        trainer = _trainer_class(cfg)(cfg, run, **kw)   # so do a bad dataset and an unavailable device

        def create_run() -> None:
            run.create()
            run.write_text(run.config_path, cfg.to_yaml())

        world.run_on_main(create_run)
        return trainer

    @staticmethod
    def resume(out: str, **kw) -> Training:
        """The trainer that continues the interrupted run directory ``out`` with its saved config."""
        run = _run_dir(out, current_world())
        run.require_resumable()
        if not run.config_path.is_file():
            raise RunDirError(f"cannot resume {run.root}: config.yaml is missing")
        cfg = config_from_dict(yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {})
        return _trainer_class(cfg)(cfg, run, **kw)

    def search(self) -> Genotype:
        """Search only (or continue an interrupted search); writes genotype.json."""
        return self._search(self.ctx.load_checkpoint())

    def _search(self, ckpt: dict[str, Any] | None) -> Genotype:
        if ckpt is not None and ckpt["phase"] == RETRAIN:
            return Genotype.from_dict(ckpt["genotype"])
        genotype = SearchPhase(self.ctx, Projector(self.ctx)).run(ckpt)
        self.ctx.run.write_json(self.ctx.run.genotype_path, {"genotype": genotype.to_dict(),
                                                            "darts": genotype.to_darts_string()})
        return genotype

    def train(self) -> dict[str, Any]:
        """Search (unless a genotype is given), then retrain; returns the report."""
        ctx = self.ctx
        ckpt = ctx.load_checkpoint()
        if ctx.cfg.genotype:
            genotype = load_genotype(ctx.cfg.genotype)
            ctx.run.write_json(ctx.run.genotype_path, {"genotype": genotype.to_dict(),
                                                      "darts": genotype.to_darts_string(),
                                                      "source": ctx.cfg.genotype})
            search_report = None
        else:
            genotype = self._search(ckpt)
            search_report = search_summary(ctx)
        retrain_ckpt = ckpt if ckpt is not None and ckpt["phase"] == RETRAIN else None
        return RetrainPhase(ctx, Projector(ctx), genotype).run(retrain_ckpt, search_report)
