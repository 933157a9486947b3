import pytest
import torch

import spa_viz
from spa_viz.selection.loss import selection_loss
from tests.conftest import tiny_vit


def test_selection_loss_drives_gates_to_labels() -> None:
    model = spa_viz.patch(tiny_vit(), 1).train()
    labels = (torch.rand(4, 16) < 0.3).float()
    bright = labels.reshape(4, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    images = 0.3 * torch.randn(4, 3, 32, 32) + 2.0 * bright
    gates = [p for b in spa_viz.spa_blocks(model) for p in b.gate.parameters()]
    optimizer = torch.optim.Adam(gates, lr=0.1)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        model(images)
        loss = spa_viz.model_selection_loss(model, labels, alpha=1.0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    _, tr = spa_viz.trace(model.eval(), images)
    for layer in tr.layers:
        accuracy = (layer.keep == labels.bool()).float().mean()
        assert accuracy > 0.9, f"layer {layer.layer}: keep mask agrees with labels on {accuracy:.0%} of tokens"


def test_selection_loss_sums_over_blocks_with_alpha() -> None:
    scores = [((2, 2), torch.zeros(1, 4)), ((1, 1), torch.zeros(1, 1))]
    labels = {(2, 2): torch.ones(1, 4), (1, 1): torch.zeros(1, 1)}
    expected = 0.01 * 2 * torch.log(torch.tensor(2.0))
    assert torch.isclose(selection_loss(scores, labels), expected)


def test_selection_loss_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="no selection labels for token grid"):
        selection_loss([((2, 2), torch.zeros(1, 4))], {(4, 4): torch.zeros(1, 16)})
    with pytest.raises(ValueError, match="do not match scores"):
        selection_loss([((2, 2), torch.zeros(1, 4))], torch.zeros(1, 5))
    with pytest.raises(ValueError, match="run the model forward"):
        selection_loss([], torch.zeros(1, 4))
