"""Every bad input a user can give gets a clear error, never a traceback, a hang or a silent acceptance.

Through the API: a :class:`fedleak.FedleakError` subclass whose message names the problem. Grouped by area: option
validation, updates, models (data files and outputs: ``test_bad_files.py``; the command line:
``test_bad_command_line.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from bad_input import SHAPE, raises
from safetensors.torch import save_file
from torch import nn
from user_models import BatchNormMLP

import fedleak
from fedleak.errors import OptionError, OutputError
from fedleak.option_fields import validate_fields
from fedleak.validation import MAX_CLASSES, check_float, check_int, check_labels, check_shape

# --- option dataclasses (validate_fields) -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    tol: float = 1e-5
    offset: float = dataclasses.field(default=0.0, metadata={"low": -1.0, "high": 1.0})
    rows: int = 32
    solve: bool = True
    clip: float | None = None
    name: str = "free text is not checked"

    def __post_init__(self) -> None:
        validate_fields(self)


class TestOptionFields:
    def test_defaults_and_valid_values_pass(self):
        _Options()
        _Options(tol=0, offset=-0.5, rows=np.int64(3), solve=np.bool_(False), clip=2.0, name="x")

    @pytest.mark.parametrize(
        "kwargs, fragments",
        [
            ({"tol": "abc"}, ("option tol", "real number", "str 'abc'")),
            ({"tol": -1e-3}, ("option tol", "at least 0")),
            ({"tol": float("nan")}, ("option tol", "finite")),
            ({"tol": float("inf")}, ("option tol", "finite")),
            ({"tol": True}, ("option tol", "real number", "bool")),
            ({"offset": 1.5}, ("option offset", "[-1.0, 1.0]")),
            ({"rows": 2.5}, ("option rows", "whole number", "float 2.5")),
            ({"rows": "32"}, ("option rows", "whole number")),
            ({"rows": -1}, ("option rows", "at least 0")),
            ({"solve": 1}, ("option solve", "True or False")),
            ({"clip": "1"}, ("option clip", "real number")),
        ],
    )
    def test_bad_field_names_the_option(self, kwargs, fragments):
        raises(OptionError, fragments, _Options, **kwargs)

    def test_real_type_annotations_are_checked_too(self):
        cls = dataclasses.make_dataclass("Opt", [("lr", float), ("steps", int | None)])
        validate_fields(cls(0.1, None))
        raises(OptionError, ("option lr", "real number"), validate_fields, cls("fast", 1))
        raises(OptionError, ("option steps", "whole number"), validate_fields, cls(0.1, 1.5))

    def test_the_attack_options_defaults_pass(self):
        validate_fields(fedleak.ExclusivityOptions())
        validate_fields(fedleak.FishingOptions())

    # these two pass once ExclusivityOptions calls validate_fields in __post_init__
    def test_group_tol_not_a_number(self, model, update):
        raises(fedleak.FedleakError, ("group_tol",), fedleak.reconstruct, model, update, group_tol="abc")

    def test_group_tol_negative(self, model, update):
        raises(fedleak.FedleakError, ("group_tol",), fedleak.reconstruct, model, update, group_tol=-1e-3)


class TestScalarChecks:
    @pytest.mark.parametrize("value", ["8", 2.5, True, None, 10**30])
    def test_check_int(self, value):
        with pytest.raises(fedleak.FedleakError, match="n must"):
            check_int("n", value, low=1, high=2**31 - 1)

    @pytest.mark.parametrize("value", ["1", float("nan"), False, -1.0])
    def test_check_float(self, value):
        with pytest.raises(fedleak.FedleakError, match="x must"):
            check_float("x", value, low=0.0)

    @pytest.mark.parametrize("shape", [(-1, -64), (), (0, 4), (1.0, 4), "1,4,4", 16])
    def test_check_shape(self, shape):
        with pytest.raises(fedleak.ModelError, match="input_shape must"):
            check_shape("input_shape", shape)

    @pytest.mark.parametrize(
        "labels, fragment",
        [
            (np.array([0, -1]), "must not be negative"),
            (np.array([0, 3]), "[0, 2] for 3 classes"),
            (np.array([0.0, 1.0]), "integer class indices"),
            (torch.tensor([0.0, 1.0]), "integer class indices"),
            (np.array([[0, 1]]), "one-dimensional"),
            (np.array(["a", "b"]), "integer class indices"),
        ],
    )
    def test_check_labels(self, labels, fragment):
        raises(fedleak.FedleakError, (fragment,), check_labels, labels, 3)

    def test_check_labels_bounds_the_inferred_classes(self):
        assert check_labels(np.array([0, MAX_CLASSES - 1])).dtype == np.int64
        raises(fedleak.FedleakError, ("at most 100,000 classes", "renumber"), check_labels, np.array([0, 10**12]))


# --- updates --------------------------------------------------------------------------------------------------------


class TestUpdates:
    @pytest.mark.parametrize(
        "num_examples, fragment",
        [("8", "whole number, got str '8'"), (2.5, "whole number, got float 2.5"), (10**30, "must lie in"),
         (0, "must lie in"), (True, "whole number")],
    )
    def test_gradient_update_num_examples(self, update, num_examples, fragment):
        raises(fedleak.UpdateError, ("num_examples", fragment), fedleak.GradientUpdate, update.gradients,
                num_examples=num_examples)

    @pytest.mark.parametrize("field, value", [("num_examples", "8"), ("num_examples", 10**30), ("local_steps", 1.5)])
    def test_weight_update_counts(self, model, field, value):
        before = model.state_dict()
        after = {k: v + 0.01 for k, v in before.items()}
        raises(fedleak.UpdateError, (field,), fedleak.WeightUpdate, before, after, **{field: value})

    def test_counts_are_stored_as_int(self, update):
        assert type(fedleak.GradientUpdate(update.gradients, num_examples=np.int64(4)).num_examples) is int

    def test_empty_pt_file(self, tmp_path):
        (tmp_path / "u.pt").write_bytes(b"")
        raises(fedleak.UpdateError, ("u.pt", "is empty"), fedleak.load_update, tmp_path / "u.pt")

    def test_pt_file_with_an_empty_dict(self, tmp_path):
        torch.save({}, tmp_path / "u.pt")
        raises(fedleak.UpdateError, ("non-empty",), fedleak.load_update, tmp_path / "u.pt")

    def test_pickle_refusal_does_not_advise_unpickling(self, tmp_path):
        torch.save({"w": torch.zeros(2), "f": print}, tmp_path / "u.pt")
        message = raises(fedleak.UpdateError, ("u.pt", "never unpickles", "safetensors"), fedleak.load_update,
                          tmp_path / "u.pt")
        assert "weights_only" not in message and "False" not in message

    @pytest.mark.parametrize("key, value", [("num_examples", "abc"), ("num_examples", "-3"), ("local_steps", "1.5")])
    def test_bad_metadata(self, tmp_path, model, key, value):
        state = model.state_dict()
        tensors = {f"before/{k}": v.contiguous() for k, v in state.items()}
        tensors.update({f"after/{k}": (v + 1).contiguous() for k, v in state.items()})
        save_file(tensors, tmp_path / "u.safetensors", metadata={"kind": "weights", key: value})
        raises(fedleak.UpdateError, ("u.safetensors", f"metadata {key}"), fedleak.load_update,
                tmp_path / "u.safetensors")

    @pytest.mark.parametrize(
        "labels, fragment",
        [([0, 1, -1, 0], "must not be negative"), ([0, 1, 10**9, 0], "must lie in [0, 2]"),
         ([0, 1, 3, 0], "must lie in [0, 2] for 3 classes")],
    )
    def test_labels_outside_the_classes(self, model, batch, labels, fragment):
        raises(fedleak.DataError, ("labels", fragment), fedleak.compute_gradient_update, model, batch[0],
                torch.tensor(labels))

    def test_float_labels(self, model, batch):
        raises(fedleak.DataError, ("integer class indices", "float"), fedleak.compute_gradient_update, model,
                batch[0], torch.tensor([0.0, 1.5, 2.0, 0.0]))

    def test_labels_checked_against_the_model_in_local_training(self, model, batch):
        raises(fedleak.DataError, ("labels", "for 3 classes"), fedleak.fedavg_update, model, batch[0],
                torch.tensor([0, 1, 7, 0]), lr=0.1)

    def test_save_update_to_a_folder(self, tmp_path, update):
        raises(OutputError, ("is a folder",), fedleak.save_update, update, tmp_path)
        assert list(tmp_path.iterdir()) == []

    def test_save_update_with_a_missing_parent(self, tmp_path, update):
        raises(OutputError, ("does not exist",), fedleak.save_update, update, tmp_path / "no" / "u.safetensors")
        assert list(tmp_path.iterdir()) == []


# --- models ---------------------------------------------------------------------------------------------------------


class TestModels:
    def test_frozen_dense_layer(self, model, batch):
        """The exact attack reads every Linear layer's gradient: a frozen one is named, with what still applies."""
        model[1].weight.requires_grad_(False)
        update = fedleak.compute_gradient_update(model, *batch)  # what such a client sends: no frozen gradient
        assert "1.weight" not in update.gradients
        raises(fedleak.ModelError, ("frozen", "1.weight", "optimisation attacks"), fedleak.reconstruct, model, update)

    @pytest.mark.parametrize("compile_", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(2, *SHAPE))])
    @pytest.mark.parametrize("attack", ["exclusivity", "auto", "ig"])
    def test_a_torchscript_module_is_refused_saying_what_to_pass(self, model, update, compile_, attack):
        """A scripted or traced model has no Python forward to trace or to call with other weights."""
        raises(fedleak.ModelError, ("TorchScript", "load_state_dict"), fedleak.reconstruct, compile_(model), update,
                attack=attack)

    @pytest.mark.parametrize("bad", [None, "model.safetensors"])
    def test_reconstruct_without_a_model(self, update, bad):
        raises(fedleak.ModelError, ("torch.nn.Module",), fedleak.reconstruct, bad, update)

    def test_reconstruct_with_a_negative_input_shape(self, model, update):
        raises(fedleak.ModelError, ("input_shape", "(-1, -64)"), fedleak.reconstruct, model, update,
                input_shape=(-1, -64))
        raises(fedleak.ModelError, ("input_shape", "(-1, -16)"), fedleak.reconstruct, model, update,
                input_shape=(-1, -16))  # the product matches the model: still refused

    def test_nan_weights(self, model, batch, update):
        with torch.no_grad():
            model[1].weight[0, 0] = float("nan")
        raises(fedleak.ModelError, ("'1.weight'", "non-finite"), fedleak.reconstruct, model, update)
        raises(fedleak.ModelError, ("'1.weight'", "non-finite"), fedleak.compute_gradient_update, model, *batch)

    def test_one_output_class(self, batch):
        """A single logit is a binary classifier (tests/test_binary.py): its labels are 0 or 1, and the functions
        that need classes say to pass its two-class twin."""
        one = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        raises(fedleak.DataError, ("labels must lie in [0, 1]",), fedleak.compute_gradient_update, one, batch[0],
                torch.full((4,), 2))
        raises(fedleak.ModelError, ("1 output", "at least 2 classes", "fedleak.binary_twin(model).model"),
                fedleak.as_network, one, input_shape=(16,))

    def test_inputs_the_model_cannot_take(self, model):
        raises(fedleak.ModelError, ("cannot take inputs of shape (2, 5)",), fedleak.compute_gradient_update, model,
                torch.rand(2, 5), torch.tensor([0, 1]))

    def test_one_input_through_batchnorm_in_training_mode(self):
        """torch raises a ValueError there: the client simulators say it in one line, with the cause."""
        torch.manual_seed(0)
        model = BatchNormMLP(16, 8, 3).train()
        x, y = torch.rand(4, 16), torch.tensor([0, 1, 2, 0])
        cause = ("a BatchNorm layer in training mode needs at least 2 inputs per batch: use batches of 2 or more, "
                 "or run the model (its clients) in eval mode")
        raises(fedleak.ModelError, ("cannot take inputs of shape (1, 16)", cause), fedleak.compute_gradient_update,
                model, x[:1], y[:1])
        raises(fedleak.ModelError, ("cannot take inputs of shape (1, 16)", cause), fedleak.fedavg_update, model, x, y,
                lr=0.1, batch_size=1)
        assert fedleak.compute_gradient_update(model.eval(), x[:1], y[:1]).num_examples == 1

    @pytest.mark.parametrize(
        "change, metadata, fragments",
        [
            ({"1.bias": torch.zeros(5)}, {}, ("'1.bias' has shape (5,)", "needs shape (16,)")),
            ({}, {"input_shape": "not json"}, ("metadata input_shape", "not a JSON list")),
            ({}, {"input_shape": "[-8, -8]"}, ("metadata input_shape", "positive whole numbers")),
            ({}, {"input_shape": "[1.5, 4]"}, ("metadata input_shape", "positive whole numbers")),
            ({"3.weight": torch.zeros(1, 16), "3.bias": torch.zeros(1)}, {}, ("1 output", "at least 2 classes")),
            ({"1.weight": torch.full((16, 16), float("nan"))}, {}, ("'1.weight'", "non-finite")),
            ({"1.weight": torch.zeros(16, 16, dtype=torch.int64)}, {}, ("'1.weight'", "floating-point")),
        ],
    )
    def test_bad_model_files(self, tmp_path, model, change, metadata, fragments):
        state = {**model.state_dict(), **change}
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "m.safetensors", metadata=metadata)
        raises(fedleak.ModelError, ("m.safetensors", *fragments), fedleak.load_mlp, tmp_path / "m.safetensors")

    def test_empty_model_file(self, tmp_path):
        (tmp_path / "m.pt").write_bytes(b"")
        raises(fedleak.ModelError, ("m.pt", "is empty"), fedleak.load_mlp, tmp_path / "m.pt")

    def test_load_mlp_with_a_negative_input_shape(self, tmp_path, model):
        fedleak.save_mlp(model, tmp_path / "m.safetensors")
        raises(fedleak.ModelError, ("input_shape",), fedleak.load_mlp, tmp_path / "m.safetensors", (-1, -16))

    def test_save_mlp_to_a_folder(self, tmp_path, model):
        raises(OutputError, ("is a folder",), fedleak.save_mlp, model, tmp_path)
