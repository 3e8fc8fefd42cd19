"""The per-batch pieces every phase shares: one weight step on a NASXNet stage's loss, the stage's loss and
prediction as functions of the parameters (what the architect differentiates), and evaluation.

Data-parallel (:mod:`nasxserve.training.distributed`), a step's batch is this process's shard and the
gradients are averaged over the processes before clipping; evaluation adds up every process's counts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nasxserve.data import ImageSet
from nasxserve.protos.last_layer import constrain_signs_
from nasxserve.protos.losses import LossWeights, Stage, joint_logits, stage_loss
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.architect import Reducer
from nasxserve.training.distributed import World
from nasxserve.training.extensions import Extension
from nasxserve.training.precision import Precision


@dataclass
class EvalResult:
    acc: float              # prototype path (or the stage's prediction in stage 1)
    aux_acc: float | None
    loss: float
    n: int


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: ExplainableNet, images: ImageSet, batch_size: int, device: torch.device,
             prototype_path: bool = True, channels_last: bool = False,
             precision: Precision | None = None, world: World = World()) -> EvalResult:
    """Top-1 accuracy of the prototype path (or of h1 with ``prototype_path=False``) and of h1 on ``images``
    (eval mode); ``aux_acc`` is None for a model without h1.

    Across processes each evaluates its block of whole batches and the per-batch counts are added up in
    batch order, so the result is the single-process one (given the same model on every process)."""
    was = model.training
    model.eval()
    counts = []   # per batch: (summed loss, correct, correct by h1, images)
    for b in world.batch_block(images.num_batches(batch_size)):
        x, y = to_device(*images.numbered_batch(b, batch_size, device), device, channels_last)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            out = model(x, prototype_path=prototype_path, aux_path=True)
        main = (out.logits if prototype_path else out.aux_logits).float()
        right_aux = 0 if out.aux_logits is None else int((out.aux_logits.float().argmax(1) == y).sum())
        counts.append((float(F.cross_entropy(main, y, reduction="sum")), int((main.argmax(1) == y).sum()),
                       right_aux, len(y)))
    model.train(was)
    correct = correct_aux = total = 0
    loss_sum = 0.0
    for block in world.all_gather_object(counts):     # blocks in rank order: batches in order
        for loss, right, right_aux, k in block:
            loss_sum += loss
            correct, correct_aux, total = correct + right, correct_aux + right_aux, total + k
    aux_acc = correct_aux / total if model.aux_head is not None else None   # ProtoPNet has no h1
    return EvalResult(acc=correct / total, aux_acc=aux_acc, loss=loss_sum / total, n=total)


def stage_prediction(stage: Stage, out, lambda1: float) -> torch.Tensor:
    if stage is Stage.ADAPT:
        return out.aux_logits
    if stage is Stage.JOINT:
        return joint_logits(out, lambda1)
    return out.logits


def functional_stage_loss(model: ExplainableNet, stage: Stage, weights: LossWeights):
    """``loss(tensors, x, y)``: the stage's loss (eq. 4, 5 or 7) of ``model`` evaluated with the given
    parameters and buffers (``torch.func.functional_call``), as the architect needs."""
    def loss(tensors: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, tensors, (x,), {"prototype_path": stage.uses_prototypes,
                                                     "aux_path": stage.uses_aux})
        return stage_loss(stage, out, y, tensors["prototype_layer.prototypes"], weights)
    return loss


def functional_stage_logits(model: ExplainableNet, stage: Stage, weights: LossWeights):
    """``logits(tensors, x)``: the stage's prediction (B, K) evaluated with the given parameters and
    buffers, the explainer's output f(x; E) that LeaSE perturbs (eq. 7)."""
    def logits(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, tensors, (x,), {"prototype_path": stage.uses_prototypes,
                                                     "aux_path": stage.uses_aux})
        return stage_prediction(stage, out, weights.lambda1)
    return logits


def apply_gradients(loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                    precision: Precision | None = None, clip: float | None = None,
                    reduce_gradients: Reducer | None = None) -> None:
    """One ``optimizer`` step on the gradient of ``loss`` with respect to ``params`` alone (other parameters
    get none). With fp16 the loss is scaled, the gradients unscaled before clipping and a step with inf/nan
    gradients skipped; ``clip`` bounds their total norm; ``reduce_gradients`` averages them over processes
    first, so that every process clips, skips and steps alike."""
    scaler = precision.scaler if precision is not None else None
    grads = list(torch.autograd.grad(scaler.scale(loss) if scaler else loss, params, allow_unused=True))
    if reduce_gradients is not None:
        grads = reduce_gradients(grads)   # an inf or nan on any process reaches all: all skip the step
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g
    if scaler:
        scaler.unscale_(optimizer)
    if clip is not None:
        nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def weight_step(model: ExplainableNet, stage: Stage, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer, params: list[nn.Parameter], weights: LossWeights,
                clip: float, precision: Precision | None = None,
                reduce_gradients: Reducer | None = None, sign_floor: float | None = None,
                extensions: Sequence[Extension] = ()) -> tuple[float, float]:
    """One SGD step on the stage's loss; returns (loss, accuracy of the stage's prediction) on ``x``.

    Only ``params`` get gradients (alpha is left to the architect). In stage 3 the last layer is held fixed: the
    paper fine-tunes the feature extractor and the prototypes only. Each of ``extensions`` (this project's, in
    neither paper; :mod:`nasxserve.training.extensions`) may add a term to the loss. With ``sign_floor`` a step that
    trains h puts it back on the sign constraint of :mod:`nasxserve.protos.last_layer` (own-class connections >=
    sign_floor, the others <= 0), so that between projections too every prototype supports only its own class. The
    forward passes run under ``precision``'s autocast; with fp16 the loss is scaled and a step with inf/nan
    gradients skipped.
    Data-parallel: ``x`` is this process's shard and ``reduce_gradients`` averages the gradients over
    processes before clipping, so every process clips, skips and steps alike.
    """
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        out = model(x, prototype_path=stage.uses_prototypes, aux_path=stage.uses_aux)
        loss = stage_loss(stage, out, y, model.prototype_layer.prototypes, weights)
        for extension in extensions:
            term = extension.loss_term(model, stage, x, y, out)
            if term is not None:
                loss = loss + term
    trainable = [p for p in params if not (stage is Stage.FINETUNE and p is model.last_layer.weight)]
    apply_gradients(loss, trainable, optimizer, precision, clip, reduce_gradients)
    if sign_floor is not None and stage.uses_prototypes and any(p is model.last_layer.weight for p in trainable):
        constrain_signs_(model.last_layer.weight, model.prototype_layer.prototype_class, sign_floor)
    pred = stage_prediction(stage, out, weights.lambda1)
    return float(loss.detach()), float((pred.argmax(1) == y).float().mean())
