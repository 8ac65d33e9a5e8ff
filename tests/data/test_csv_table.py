"""Tabular data as users keep it: .csv/.tsv tables of records, read as N x 1 x 1 x D inputs."""

import numpy as np
import pytest
import torch

import fedleak
from fedleak.errors import DataError


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_table_with_a_header_names_its_label_column(tmp_path):
    table = _write(tmp_path / "adult.csv", ["age,target,income", "39,<=50K,0.25", "50,>50K,0.5", "38,<=50K,0.75"])
    data = fedleak.load_dataset(table)
    assert data.input_shape == (1, 1, 2) and data.classes == ("<=50K", ">50K") and data.y.tolist() == [0, 1, 0]
    assert torch.equal(data.x[:, 0, 0], torch.tensor([[39.0, 0.25], [50.0, 0.5], [38.0, 0.75]]))
    assert data.value_range == (0.25, 50.0)  # where the values lie: metrics measure errors on it
    assert "labels: 'target'" in data.source


def test_without_a_header_the_last_column_holds_the_labels(tmp_path):
    semicolons = _write(tmp_path / "plain.csv", ["0.1;0.2;1", "0.3;0.4;0", "0.5;0.6;2"])
    data = fedleak.load_dataset(semicolons)
    assert data.classes == ("0", "1", "2") and data.y.tolist() == [1, 0, 2] and data.value_range == (0.0, 1.0)
    tabs = _write(tmp_path / "t.tsv", ["f1\tf2\tclass", "0.1\t0.2\tcat", "0.3\t0.9\tdog"])
    assert fedleak.load_dataset(tabs).classes == ("cat", "dog")


@pytest.mark.parametrize("lines, message", [
    (["sex,age,label", "M,30,1", "F,40,0"], "'sex', line 2, holds 'M': every feature must be a finite number"),
    (["a,b,label", "1,2,0", "3,,1"], "'b', line 3, is empty"),
    (["a,b,label", "1,nan,0"], "'b', line 2, holds 'nan'"),
    (["a,b,label", "1,2,0", "3,4"], "line 3 has 2 cells, the first row 3"),
    (["a,y,label", "1,2,0"], "columns 'y', 'label' could each be the labels"),
    (["a,b,label", "1,2,0.5"], "the labels hold non-integer numbers"),
    (["a,b,label"], "holds no records under its header"),
    (["label", "1"], "one column only"),
])
def test_what_a_table_may_not_hold_is_named(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        fedleak.load_dataset(_write(tmp_path / "bad.csv", lines))


def test_the_exact_attack_rebuilds_a_tables_records(tmp_path):
    """Standardised features, as tabular pipelines store them: one record's gradient gives it back exactly."""
    gen = np.random.default_rng(0)
    x = gen.standard_normal((40, 12))
    rows = [",".join([f"f{i}" for i in range(12)] + ["label"])]
    rows += [",".join(f"{v:.6f}" for v in r) + f",{int(r.sum() > 0)}" for r in x]
    data = fedleak.load_dataset(_write(tmp_path / "records.csv", rows))
    model = fedleak.make_mlp(data.input_shape, [256], data.num_classes, seed=0)
    xb, yb = data.batch(2, seed=1)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, xb, yb))
    scores = fedleak.metrics.match(rec, xb, yb, data_range=data.value_range)
    assert rec.num_certified == 2 and scores.recovered.all() and not scores.false_certificate.any()
