"""The membership target's training: its defense bound to the data (augmentation fills with the data's black)."""

from fedleak.defenses.augmentation import Augmentation
from fedleak.membership.base import Records
from fedleak.membership.training import TrainingRecipe


def test_a_target_trained_with_augmentation_shifts_in_the_data_s_lowest_value(monkeypatch, digits):
    seen = []
    draw = Augmentation.__call__

    def spy(self, model, inputs, labels):
        seen.append(self.fill_value)
        return draw(self, model, inputs, labels)

    monkeypatch.setattr(Augmentation, "__call__", spy)
    recipe = TrainingRecipe(tuple(digits.input_shape), digits.num_classes, widths=(16,), epochs=1, batch_size=32,
                            defense="augmentation:padding=1", data_range=(-3.0, 1.0))
    recipe.train(Records(digits.x[:64], digits.y[:64]), seed=0)
    assert seen == [-3.0, -3.0]  # two mini-batches, each augmented, black as the data's range says


def test_a_target_trained_with_a_random_batch_defense_depends_on_its_seed_only(digits):
    import torch

    recipe = TrainingRecipe(tuple(digits.input_shape), digits.num_classes, widths=(16,), epochs=2, batch_size=32,
                            defense="augmentation:padding=1")
    records = Records(digits.x[:64], digits.y[:64])
    torch.manual_seed(1)
    first = recipe.train(records, seed=5)
    torch.manual_seed(2)  # another caller's generator state
    again = recipe.train(records, seed=5)
    other = recipe.train(records, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))

