import json

import numpy as np

import pytest

import fedleak
from fedleak.audit import AuditSettings, run_audit, write_audit


def test_audit_runs_scores_and_writes_provenance(tmp_path):
    settings = AuditSettings(data="digits", widths=(256,), batch_sizes=(2, 16), trials=2, seed=7)
    result = run_audit(settings)
    assert len(result.batches) == 4
    rows = result.summary_rows()
    assert [r["batch_size"] for r in rows] == [2, 16]
    assert all(r["false_certificates"] == 0 for r in rows)
    assert rows[0]["recovered_fraction"] >= rows[0]["certifiable_fraction"]
    results, report = write_audit(result, tmp_path / "out")
    payload = json.loads(results.read_text())
    assert payload["seed"] == 7 and payload["settings"]["widths"] == [256]
    assert payload["environment"]["packages"]["torch"].startswith("2.13.0")
    assert len(payload["batches"]) == 4 and "psnr" in payload["batches"][0]["per_sample"]
    page = report.read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "http" not in page.split("<body>")[1]


def test_audit_is_reproducible():
    settings = AuditSettings(data="digits", widths=(128,), batch_sizes=(8,), seed=3)
    a, b = run_audit(settings), run_audit(settings)
    for key, values in a.batches[0].per_sample.items():
        assert np.array_equal(np.asarray(values, dtype=float), np.asarray(b.batches[0].per_sample[key], dtype=float),
                              equal_nan=True), key


def test_failed_write_keeps_the_previous_results(tmp_path, monkeypatch):
    settings = AuditSettings(data="digits", widths=(64,), batch_sizes=(2,))
    result = run_audit(settings)
    results, _ = write_audit(result, tmp_path)
    before = results.read_text()
    import fedleak.audit.report as report_module

    def broken(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "results_payload", broken)
    with pytest.raises(RuntimeError):
        write_audit(result, tmp_path)
    assert results.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.json"]


def test_bad_settings():
    with pytest.raises(fedleak.FedleakError, match="batch sizes"):
        AuditSettings(batch_sizes=(0,))
    with pytest.raises(fedleak.FedleakError, match="scenario"):
        run_audit(AuditSettings(widths=(8,), batch_sizes=(1,), scenarios=("nope",)))
    with pytest.raises(fedleak.FedleakError, match="samples"):
        run_audit(AuditSettings(widths=(8,), batch_sizes=(5000,)))


def test_audit_of_a_cnn(tmp_path):
    settings = AuditSettings(data="digits", widths=(128,), conv=(4, 16), batch_sizes=(1, 2), seed=0)
    result = run_audit(settings)
    rows = result.summary_rows()
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["false_certificates"] == 0 for r in rows)
    results, _ = write_audit(result, tmp_path)
    assert json.loads(results.read_text())["settings"]["conv"] == [4, 16]
