"""The augmentation-aware membership attack: the loss averaged over a record's flips and shifts."""

import pytest
import torch

from fedleak.defenses.augmentation import Augmentation as Views
from fedleak.errors import OptionError
from fedleak.membership import Observation, make_membership_attack
from fedleak.membership.base import Records
from fedleak.membership.signals import record_losses
from fedleak.membership.training import TrainingRecipe


def test_the_augmented_loss_averages_the_loss_over_every_view_and_needs_images(digits):
    recipe = TrainingRecipe(tuple(digits.input_shape), digits.num_classes, widths=(16,), epochs=1)
    model = recipe.train(Records(digits.x[:64], digits.y[:64]), seed=0)
    records = Records(digits.x[64:70], digits.y[64:70])
    attack = make_membership_attack("augmented-loss", padding=1, fill=0.0)
    views = Views(padding=1, fill=0.0)
    expected = -torch.stack([record_losses(model, Records(views.place(records.inputs, p), records.labels))
                             for p in views.placements()]).mean(0)
    assert len(views.placements()) == 18
    assert torch.allclose(attack.score(Observation(model), records), expected, atol=1e-6)
    with pytest.raises(OptionError, match=r"image records \(N, C, H, W\)"):
        attack.score(Observation(model), Records(digits.x[:4].flatten(1), digits.y[:4]))
    with pytest.raises(OptionError, match=r"smaller than the records' height and width \(8 x 8\), got 8"):
        make_membership_attack("augmented-loss", padding=8).score(Observation(model), records)
    with pytest.raises(OptionError, match="queries each record once"):
        make_membership_attack("augmented-loss", padding=0, flip=False)
