"""The last-layer step after projection and the consistency of prototype labels with the weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from test_deletion_cost import _batch
from test_metrics import off_spot_model

from nasxserve.explain.consistency import mislabelled_prototypes, own_class_share, supported_class
from nasxserve.protos.last_layer import LastLayerFit, constrain_signs_, fit_last_layer, reconnect_
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import class_connection_init
from nasxserve.training.steps import weight_step


def test_supported_class_and_mislabelled_by_hand():
    # columns: prototypes 0..3; rows: classes 0..2
    w = np.array([[1.0, 0.9, -0.5, 0.0],
                  [-0.5, 0.95, -0.5, 0.0],
                  [0.0, 0.0, -0.1, 0.0]])
    assert supported_class(w).tolist() == [0, 1, -1, -1]
    # 0 fine; 1 labelled 0 but votes more for 1; 2 has no positive weight; 3 is all zero
    assert mislabelled_prototypes(w, np.array([0, 0, 2, 1])).tolist() == [1, 2, 3]
    # a tie between the own class and another is not support of the own class alone
    assert mislabelled_prototypes(np.array([[0.5], [0.5]]), np.array([0])).tolist() == [0]
    assert mislabelled_prototypes(w, np.array([0, 1, 2, 1]))[:1].tolist() == [2]


def test_own_class_share_by_hand():
    w = np.array([[2.0, -1.0, 0.0],
                  [0.5, 1.0, 3.0]])
    labels = np.array([0, 1, 1])
    sims = np.array([[1.0, 2.0, 0.0],      # class 0: |2| own, |-2| other -> 0.5
                     [2.0, 1.0, 1.0],      # class 1: |1| + |3| own, |1| other -> 0.8
                     [0.0, 0.0, 0.0]])     # nothing: NaN
    share = own_class_share(w, sims, np.array([0, 1, 1]), labels)
    np.testing.assert_allclose(share[:2], [0.5, 0.8])
    assert np.isnan(share[2])


def test_constrain_signs_keeps_own_connections_positive_and_others_non_positive():
    w = torch.tensor([[0.3, -2.0, 0.7],
                      [-0.2, 0.001, 0.4]])
    constrain_signs_(w, torch.tensor([0, 1, 0]), floor=0.01)
    torch.testing.assert_close(w, torch.tensor([[0.3, -2.0, 0.7], [-0.2, 0.01, 0.0]]))


def _relabelled_problem(n: int = 600, seed: int = 0):
    """Similarities of 3 classes x 2 prototypes where projection swapped labels: prototypes 0, 1 now sit on
    class-1 patches and 2, 3 on class-0 patches, while h still connects them to their old classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    truth = torch.tensor([1, 1, 0, 0, 2, 2])                 # the class each prototype's patch looks like
    sims = 0.3 * torch.rand(n, 6, generator=g) + 2.0 * (truth[None, :] == y[:, None]).float()
    old = torch.tensor([0, 0, 1, 1, 2, 2])
    layer = nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(class_connection_init(old, 3))
    return sims, y, truth, old, layer


def test_fit_last_layer_makes_every_prototype_support_its_new_class():
    sims, y, labels, old, layer = _relabelled_problem()
    assert len(mislabelled_prototypes(layer.weight.detach().numpy(), labels.numpy())) == 4   # the bug it fixes
    fit_last_layer(layer, sims, y, labels, old, LastLayerFit(passes=10), torch.Generator().manual_seed(0))
    w = layer.weight.detach()
    assert mislabelled_prototypes(w.numpy(), labels.numpy()).tolist() == []
    own = torch.arange(3)[:, None] == labels[None, :]
    assert (w[own] >= 0.01).all() and (w[~own] <= 0).all()
    assert float(((sims @ w.T).argmax(1) == y).float().mean()) == 1.0
    share = own_class_share(w.numpy(), sims.numpy(), y.numpy(), labels.numpy())
    assert np.median(share) > 0.9, "the L1 term leaves little other-class evidence"


def test_fit_last_layer_is_reproducible_from_its_generator():
    results = []
    for _ in range(2):
        sims, y, labels, old, layer = _relabelled_problem()
        fit_last_layer(layer, sims, y, labels, old, LastLayerFit(passes=2), torch.Generator().manual_seed(3))
        results.append(layer.weight.detach().clone())
    assert torch.equal(*results)


def test_a_class_without_prototypes_gets_no_positive_evidence():
    """Global projection can leave a class with no prototype: its logit is then a sum of non-positive
    connections, so every explanation of it says there is no evidence for it, and it is reported."""
    sims, y, _, old, layer = _relabelled_problem()
    labels = torch.tensor([1, 1, 0, 0, 0, 0])      # class 2 lost both its prototypes
    fit_last_layer(layer, sims, y, labels, old, LastLayerFit(passes=5), torch.Generator().manual_seed(0))
    w = layer.weight.detach()
    assert (w[2] <= 0).all()
    assert mislabelled_prototypes(w.numpy(), labels.numpy()).tolist() == []


def test_only_the_prototypes_that_changed_class_are_reconnected():
    """Step 1: eq. (8) for a prototype whose class changed; the others keep their learnt connections."""
    w = torch.tensor([[0.7, -0.2, 0.3],
                      [-0.1, 0.9, 0.0]])
    assert reconnect_(w, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0])) == 1
    torch.testing.assert_close(w, torch.tensor([[0.7, 1.0, 0.3], [-0.1, -0.5, 0.0]]))


def test_a_fit_with_nothing_relabelled_starts_from_the_current_h():
    """No class changed: the fit starts where training left h (ProtoPNet keeps h across a push), not from
    eq. (8) again; with a vanishing step it ends there too."""
    sims, y, truth, _, layer = _relabelled_problem()
    learnt = torch.tensor([[0.0, 0.0, 2.0, 1.5, -0.3, 0.0],
                           [0.8, 1.2, 0.0, -0.1, 0.0, 0.0],
                           [-0.2, 0.0, 0.0, 0.0, 0.6, 0.9]])
    with torch.no_grad():
        layer.weight.copy_(learnt)
    fit_last_layer(layer, sims, y, truth, truth.clone(), LastLayerFit(passes=1, lr=1e-9), torch.Generator())
    torch.testing.assert_close(layer.weight.detach(), learnt, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sign_floor", [0.01, None])
def test_a_stage_2_step_keeps_h_on_the_sign_constraint_unless_told_not_to(sign_floor):
    """projection.signs_between_projections: a weight step that trains h puts it back on the constraint; without
    it a large step gives prototype 1 (class 1) a positive weight to class 0, the case the constraint forbids."""
    x, y, _ = _batch()
    model = off_spot_model(None).train()
    h = model.last_layer.weight
    weight_step(model, Stage.JOINT, x, y, torch.optim.SGD([h], lr=50.0), [h], LossWeights(), clip=1e9,
                sign_floor=sign_floor)
    w = h.detach()
    if sign_floor is None:
        assert w[0, 1] > 0
    else:
        assert w[0, 1] == 0 and w[1, 0] <= 0 and (w.diagonal() >= sign_floor).all()
        assert mislabelled_prototypes(w.numpy(), np.array([0, 1])).tolist() == []
