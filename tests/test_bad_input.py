"""Every bad input a user can give gets a clear error, never a traceback, a hang or a silent acceptance.

Through the API: a :class:`fedleak.FedleakError` subclass whose message names the problem. Through the
command line: one line ``fedleak: error: ...`` on stderr and exit code 2 (130 for Ctrl-C), no output folder
left behind and no half-written set of outputs. Grouped by area: option validation, updates, models, data
files, outputs, command line.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from user_models import BatchNormMLP

import fedleak
from fedleak.cli import main
from fedleak.errors import OptionError, OutputError
from fedleak.report.output import staged_output, write_atomic
from fedleak.validation import MAX_CLASSES, check_float, check_int, check_labels, check_shape, validate_fields

SHAPE = (1, 4, 4)


@pytest.fixture
def model() -> fedleak.MLP:
    return fedleak.make_mlp(SHAPE, [16], 3, seed=0)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])


@pytest.fixture
def update(model, batch) -> fedleak.GradientUpdate:
    return fedleak.compute_gradient_update(model, *batch)


def _raises(error: type[Exception], fragments: tuple[str, ...], fn, *args, **kwargs) -> str:
    """Call ``fn`` expecting ``error`` whose message holds every fragment; return the message."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, fedleak.FedleakError)
    for fragment in fragments:
        assert fragment in message, message
    return message


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
        _raises(OptionError, fragments, _Options, **kwargs)

    def test_real_type_annotations_are_checked_too(self):
        cls = dataclasses.make_dataclass("Opt", [("lr", float), ("steps", int | None)])
        validate_fields(cls(0.1, None))
        _raises(OptionError, ("option lr", "real number"), validate_fields, cls("fast", 1))
        _raises(OptionError, ("option steps", "whole number"), validate_fields, cls(0.1, 1.5))

    def test_the_attack_options_defaults_pass(self):
        validate_fields(fedleak.ExclusivityOptions())
        validate_fields(fedleak.FishingOptions())

    # these two pass once ExclusivityOptions calls validate_fields in __post_init__
    def test_group_tol_not_a_number(self, model, update):
        _raises(fedleak.FedleakError, ("group_tol",), fedleak.reconstruct, model, update, group_tol="abc")

    def test_group_tol_negative(self, model, update):
        _raises(fedleak.FedleakError, ("group_tol",), fedleak.reconstruct, model, update, group_tol=-1e-3)


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
        _raises(fedleak.FedleakError, (fragment,), check_labels, labels, 3)

    def test_check_labels_bounds_the_inferred_classes(self):
        assert check_labels(np.array([0, MAX_CLASSES - 1])).dtype == np.int64
        _raises(fedleak.FedleakError, ("at most 100,000 classes", "renumber"), check_labels, np.array([0, 10**12]))


# --- updates --------------------------------------------------------------------------------------------------------


class TestUpdates:
    @pytest.mark.parametrize(
        "num_examples, fragment",
        [("8", "whole number, got str '8'"), (2.5, "whole number, got float 2.5"), (10**30, "must lie in"),
         (0, "must lie in"), (True, "whole number")],
    )
    def test_gradient_update_num_examples(self, update, num_examples, fragment):
        _raises(fedleak.UpdateError, ("num_examples", fragment), fedleak.GradientUpdate, update.gradients,
                num_examples=num_examples)

    @pytest.mark.parametrize("field, value", [("num_examples", "8"), ("num_examples", 10**30), ("local_steps", 1.5)])
    def test_weight_update_counts(self, model, field, value):
        before = model.state_dict()
        after = {k: v + 0.01 for k, v in before.items()}
        _raises(fedleak.UpdateError, (field,), fedleak.WeightUpdate, before, after, **{field: value})

    def test_counts_are_stored_as_int(self, update):
        assert type(fedleak.GradientUpdate(update.gradients, num_examples=np.int64(4)).num_examples) is int

    def test_empty_pt_file(self, tmp_path):
        (tmp_path / "u.pt").write_bytes(b"")
        _raises(fedleak.UpdateError, ("u.pt", "is empty"), fedleak.load_update, tmp_path / "u.pt")

    def test_pt_file_with_an_empty_dict(self, tmp_path):
        torch.save({}, tmp_path / "u.pt")
        _raises(fedleak.UpdateError, ("non-empty",), fedleak.load_update, tmp_path / "u.pt")

    def test_pickle_refusal_does_not_advise_unpickling(self, tmp_path):
        torch.save({"w": torch.zeros(2), "f": print}, tmp_path / "u.pt")
        message = _raises(fedleak.UpdateError, ("u.pt", "never unpickles", "safetensors"), fedleak.load_update,
                          tmp_path / "u.pt")
        assert "weights_only" not in message and "False" not in message

    @pytest.mark.parametrize("key, value", [("num_examples", "abc"), ("num_examples", "-3"), ("local_steps", "1.5")])
    def test_bad_metadata(self, tmp_path, model, key, value):
        state = model.state_dict()
        tensors = {f"before/{k}": v.contiguous() for k, v in state.items()}
        tensors.update({f"after/{k}": (v + 1).contiguous() for k, v in state.items()})
        save_file(tensors, tmp_path / "u.safetensors", metadata={"kind": "weights", key: value})
        _raises(fedleak.UpdateError, ("u.safetensors", f"metadata {key}"), fedleak.load_update,
                tmp_path / "u.safetensors")

    @pytest.mark.parametrize(
        "labels, fragment",
        [([0, 1, -1, 0], "must not be negative"), ([0, 1, 10**9, 0], "must lie in [0, 2]"),
         ([0, 1, 3, 0], "must lie in [0, 2] for 3 classes")],
    )
    def test_labels_outside_the_classes(self, model, batch, labels, fragment):
        _raises(fedleak.DataError, ("labels", fragment), fedleak.compute_gradient_update, model, batch[0],
                torch.tensor(labels))

    def test_float_labels(self, model, batch):
        _raises(fedleak.DataError, ("integer class indices", "float"), fedleak.compute_gradient_update, model,
                batch[0], torch.tensor([0.0, 1.5, 2.0, 0.0]))

    def test_labels_checked_against_the_model_in_local_training(self, model, batch):
        _raises(fedleak.DataError, ("labels", "for 3 classes"), fedleak.fedavg_update, model, batch[0],
                torch.tensor([0, 1, 7, 0]), lr=0.1)

    def test_save_update_to_a_folder(self, tmp_path, update):
        _raises(OutputError, ("is a folder",), fedleak.save_update, update, tmp_path)
        assert list(tmp_path.iterdir()) == []

    def test_save_update_with_a_missing_parent(self, tmp_path, update):
        _raises(OutputError, ("does not exist",), fedleak.save_update, update, tmp_path / "no" / "u.safetensors")
        assert list(tmp_path.iterdir()) == []


# --- models ---------------------------------------------------------------------------------------------------------


class TestModels:
    def test_frozen_dense_layer(self, model, batch):
        """The exact attack reads every Linear layer's gradient: a frozen one is named, with what still applies."""
        model[1].weight.requires_grad_(False)
        update = fedleak.compute_gradient_update(model, *batch)  # what such a client sends: no frozen gradient
        assert "1.weight" not in update.gradients
        _raises(fedleak.ModelError, ("frozen", "1.weight", "optimisation attacks"), fedleak.reconstruct, model, update)

    @pytest.mark.parametrize("compile_", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(2, *SHAPE))])
    @pytest.mark.parametrize("attack", ["exclusivity", "auto", "ig"])
    def test_a_torchscript_module_is_refused_saying_what_to_pass(self, model, update, compile_, attack):
        """A scripted or traced model has no Python forward to trace or to call with other weights."""
        _raises(fedleak.ModelError, ("TorchScript", "load_state_dict"), fedleak.reconstruct, compile_(model), update,
                attack=attack)

    @pytest.mark.parametrize("bad", [None, "model.safetensors"])
    def test_reconstruct_without_a_model(self, update, bad):
        _raises(fedleak.ModelError, ("torch.nn.Module",), fedleak.reconstruct, bad, update)

    def test_reconstruct_with_a_negative_input_shape(self, model, update):
        _raises(fedleak.ModelError, ("input_shape", "(-1, -64)"), fedleak.reconstruct, model, update,
                input_shape=(-1, -64))
        _raises(fedleak.ModelError, ("input_shape", "(-1, -16)"), fedleak.reconstruct, model, update,
                input_shape=(-1, -16))  # the product matches the model: still refused

    def test_nan_weights(self, model, batch, update):
        with torch.no_grad():
            model[1].weight[0, 0] = float("nan")
        _raises(fedleak.ModelError, ("'1.weight'", "non-finite"), fedleak.reconstruct, model, update)
        _raises(fedleak.ModelError, ("'1.weight'", "non-finite"), fedleak.compute_gradient_update, model, *batch)

    def test_one_output_class(self, batch):
        """A single logit is a binary classifier (tests/test_binary.py): its labels are 0 or 1, and the functions
        that need classes say to pass its two-class twin."""
        one = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        _raises(fedleak.DataError, ("labels must lie in [0, 1]",), fedleak.compute_gradient_update, one, batch[0],
                torch.full((4,), 2))
        _raises(fedleak.ModelError, ("1 output", "at least 2 classes", "fedleak.binary_twin(model).model"),
                fedleak.as_network, one, input_shape=(16,))

    def test_inputs_the_model_cannot_take(self, model):
        _raises(fedleak.ModelError, ("cannot take inputs of shape (2, 5)",), fedleak.compute_gradient_update, model,
                torch.rand(2, 5), torch.tensor([0, 1]))

    def test_one_input_through_batchnorm_in_training_mode(self):
        """torch raises a ValueError there: the client simulators say it in one line, with the cause."""
        torch.manual_seed(0)
        model = BatchNormMLP(16, 8, 3).train()
        x, y = torch.rand(4, 16), torch.tensor([0, 1, 2, 0])
        cause = "a BatchNorm layer in training mode needs at least 2 inputs per batch"
        _raises(fedleak.ModelError, ("cannot take inputs of shape (1, 16)", cause), fedleak.compute_gradient_update,
                model, x[:1], y[:1])
        _raises(fedleak.ModelError, ("cannot take inputs of shape (1, 16)", cause), fedleak.fedavg_update, model, x, y,
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
        _raises(fedleak.ModelError, ("m.safetensors", *fragments), fedleak.load_mlp, tmp_path / "m.safetensors")

    def test_empty_model_file(self, tmp_path):
        (tmp_path / "m.pt").write_bytes(b"")
        _raises(fedleak.ModelError, ("m.pt", "is empty"), fedleak.load_mlp, tmp_path / "m.pt")

    def test_load_mlp_with_a_negative_input_shape(self, tmp_path, model):
        fedleak.save_mlp(model, tmp_path / "m.safetensors")
        _raises(fedleak.ModelError, ("input_shape",), fedleak.load_mlp, tmp_path / "m.safetensors", (-1, -16))

    def test_save_mlp_to_a_folder(self, tmp_path, model):
        _raises(OutputError, ("is a folder",), fedleak.save_mlp, model, tmp_path)


# --- data files -----------------------------------------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray, type_code: int) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _cifar(folder: Path, rows: int, labels: list) -> Path:
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((rows, 3 * 4 * 4), np.uint8), b"labels": labels}, fh, protocol=2)
    return folder


class TestDataFiles:
    def test_npz_with_no_images(self, tmp_path):
        np.savez(tmp_path / "d.npz", x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64))
        _raises(fedleak.DataError, ("d.npz", "holds no images"), fedleak.load_dataset, tmp_path / "d.npz")

    def test_npz_with_a_huge_label_fails_fast(self, tmp_path):
        np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.float32), y=np.array([0, 10**12]))
        start = time.perf_counter()
        _raises(fedleak.DataError, ("d.npz", "at most 100,000 classes"), fedleak.load_dataset, tmp_path / "d.npz")
        assert time.perf_counter() - start < 1.0

    def test_idx_with_a_huge_label_fails_fast(self, tmp_path):
        root = tmp_path / "idx"
        root.mkdir()
        _idx(root / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8), 0x08)
        _idx(root / "t10k-labels-idx1-ubyte", np.array([0, 2**31 - 1], np.int32), 0x0C)
        start = time.perf_counter()
        _raises(fedleak.DataError, ("t10k-labels-idx1-ubyte", "at most 100,000 classes"), fedleak.load_dataset, root)
        assert time.perf_counter() - start < 1.0

    def test_cifar_with_a_huge_label_fails_fast(self, tmp_path):
        root = _cifar(tmp_path / "cifar", 2, [0, 10**12])
        start = time.perf_counter()
        _raises(fedleak.DataError, ("cifar", "at most 100,000 classes"), fedleak.load_dataset, root)
        assert time.perf_counter() - start < 1.0

    def test_cifar_float_labels_are_not_truncated(self, tmp_path):
        root = _cifar(tmp_path / "cifar", 2, [0.0, 1.5])
        _raises(fedleak.DataError, ("cifar", "integer class indices"), fedleak.load_dataset, root)

    def test_cifar_with_no_images(self, tmp_path):
        root = _cifar(tmp_path / "cifar", 0, [])
        _raises(fedleak.DataError, ("cifar", "holds no images"), fedleak.load_dataset, root)


# --- outputs --------------------------------------------------------------------------------------------------------


class TestOutputs:
    def test_staged_output_writes_everything_on_success(self, tmp_path):
        with staged_output(tmp_path / "out", ("a.txt", "b.txt")) as stage:
            write_atomic(stage / "a.txt", "a")
            write_atomic(stage / "b.txt", "b")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left

    def test_staged_output_writes_nothing_on_failure(self, tmp_path):
        with pytest.raises(RuntimeError):
            with staged_output(tmp_path / "out", ("a.txt", "b.txt")) as stage:
                write_atomic(stage / "a.txt", "a")
                raise RuntimeError("the second file failed")
        assert list(tmp_path.iterdir()) == []

    def test_staged_output_keeps_the_previous_outputs_on_failure(self, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / "a.txt").write_text("old")
        with pytest.raises(OutputError, match="did not produce b.txt"):
            with staged_output(out, ("a.txt", "b.txt")) as stage:
                write_atomic(stage / "a.txt", "new")
        assert [p.name for p in out.iterdir()] == ["a.txt"] and (out / "a.txt").read_text() == "old"

    def test_a_folder_in_the_way_is_refused_before_writing(self, tmp_path):
        (tmp_path / "out" / "b.txt").mkdir(parents=True)
        with pytest.raises(OutputError, match="folder of that name is in the way"):
            with staged_output(tmp_path / "out", ("a.txt", "b.txt")):
                pass
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]

    def test_write_atomic_to_a_folder(self, tmp_path):
        _raises(OutputError, ("is a folder",), write_atomic, tmp_path, "text")


# --- command line ---------------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, model, update) -> dict[str, Path]:
    fedleak.save_mlp(model, tmp_path / "model.safetensors")
    fedleak.save_update(update, tmp_path / "update.safetensors")
    torch.save({"w": torch.zeros(2), "f": print}, tmp_path / "pickled.pt")
    return {"model": tmp_path / "model.safetensors", "update": tmp_path / "update.safetensors",
            "pickled": tmp_path / "pickled.pt", "out": tmp_path / "out"}


def _cli_fails(capsys, args: list[str], fragment: str, code: int = 2) -> str:
    """Run the CLI expecting exit ``code`` and one stderr line ``fedleak: error: ...`` holding ``fragment``."""
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error:") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err, err
    return err


def _reconstruct(files: dict[str, Path], *extra: str, update: str = "update") -> list[str]:
    return ["reconstruct", "--model", str(files["model"]), "--update", str(files[update]), "--out",
            str(files["out"]), *extra]


def _audit(out: Path, *extra: str) -> list[str]:
    return ["audit", "--batch-sizes", "1", "--widths", "8", "--out", str(out), "--quiet", *extra]


class TestCommandLine:
    @pytest.mark.parametrize(
        "extra, fragment",
        [
            (("--input-shape", "-1,-64"), "--input-shape must be"),
            (("--input-shape", "-1,-16"), "--input-shape must be"),
            (("--seed", "-1"), "--seed must lie in"),
            (("--seed", str(2**70)), "--seed must lie in"),
            (("--seed", "abc"), "'abc' is not a valid integer"),
        ],
    )
    def test_reconstruct_bad_options(self, capsys, files, extra, fragment):
        _cli_fails(capsys, _reconstruct(files, *extra), fragment)
        assert not files["out"].exists()

    def test_reconstruct_pickled_update(self, capsys, files):
        err = _cli_fails(capsys, _reconstruct(files, update="pickled"), "never unpickles")
        assert "weights_only" not in err
        assert not files["out"].exists()

    @pytest.mark.parametrize(
        "extra, fragment",
        [
            (("--widths", "1000000000000"), "--widths must lie in [1, 100,000]"),
            (("--widths", "8,-3"), "--widths must"),
            (("--conv", "0"), "--conv must"),
            (("--seed", "-1"), "--seed must lie in"),
            (("--seed", str(2**70)), "--seed must lie in"),
            (("--data", "/no/such/data"), "neither a built-in data set"),
        ],
    )
    def test_audit_bad_options(self, capsys, tmp_path, extra, fragment):
        _cli_fails(capsys, _audit(tmp_path / "out", *extra), fragment)
        assert not (tmp_path / "out").exists()

    def test_results_json_blocked_by_a_folder(self, capsys, tmp_path):
        (tmp_path / "out" / "results.json").mkdir(parents=True)
        _cli_fails(capsys, _audit(tmp_path / "out"), "results.json")
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no report.html alone

    def test_a_failing_run_leaves_no_output_folder(self, capsys, files, digits):
        other = fedleak.make_mlp(SHAPE, [8], 3, seed=1)  # the update does not match this model
        fedleak.save_mlp(other, files["model"])
        _cli_fails(capsys, _reconstruct(files), "has shape (16, 16)")
        assert not files["out"].exists()
        assert sorted(p.name for p in files["out"].parent.iterdir()) == ["model.safetensors", "pickled.pt",
                                                                         "update.safetensors"]

    def test_a_failing_write_leaves_nothing_half_written(self, capsys, files, monkeypatch):
        import fedleak.report.reconstruction as report

        def broken(path, payload):
            raise OutputError(f"cannot write {path}: disk full")

        monkeypatch.setattr(report, "write_json", broken)
        _cli_fails(capsys, _reconstruct(files, "--attack", "exclusivity"), "disk full")
        assert not files["out"].exists()
        assert not [p for p in files["out"].parent.iterdir() if p.name.startswith(".")]  # no staging left

    def test_ctrl_c_during_start_up(self, capsys, tmp_path, monkeypatch):
        import fedleak.cli.audit as audit_cli

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(audit_cli, "check_output_dir", interrupt)
        assert main(_audit(tmp_path / "out")) == 130
        assert capsys.readouterr().err == "fedleak: interrupted\n"
        assert not (tmp_path / "out").exists()

    def test_ctrl_c_before_a_command_runs(self, capsys, monkeypatch):
        import fedleak.cli as cli

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "app", interrupt)
        assert main(["info"]) == 130
        assert capsys.readouterr().err == "fedleak: interrupted\n"


def _catches_sigint(pid: int) -> bool:
    """Whether process ``pid`` has a handler of its own for SIGINT (Linux's /proc; elsewhere assumed so)."""
    import signal

    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next((line.split()[1] for line in status if line.startswith("SigCgt:")), None)
    except OSError:
        return True
    return caught is None or bool(int(caught, 16) >> (signal.SIGINT - 1) & 1)


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """A real SIGINT while the script is still starting (importing torch) or already auditing: one line, exit code
    130, no traceback, no output folder. The audit of a real data set takes seconds, so the signal always arrives
    before it ends, however fast the machine."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    # a shell's background job (``pytest ... &``) inherits SIGINT ignored, and Python then installs no handler
    proc = subprocess.Popen([sys.executable, "-m", "fedleak", "audit", "--data", "digits", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # a SIGINT before the interpreter has installed its handler kills any Python process: on a loaded machine its
    # start can take longer than the wait below, so the signal is sent only once a handler is in place
    deadline = time.monotonic() + 30
    while not _catches_sigint(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not out.exists()
