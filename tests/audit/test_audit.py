import json

import numpy as np
import pytest
import torch

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
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "://" not in page.split("<body>")[1]


def test_audit_is_reproducible():
    settings = AuditSettings(data="digits", widths=(128,), batch_sizes=(8,), seed=3)
    a, b = run_audit(settings), run_audit(settings)
    for key, values in a.batches[0].per_sample.items():
        if key in ("status", "reason"):  # per-sample words: why each sample is (not) recovered
            assert values == b.batches[0].per_sample[key], key
            continue
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


def test_a_false_certificate_is_counted_and_shown_in_red(tmp_path, monkeypatch):
    """An attack that certifies one sample more than the batch holds (a blend of two originals, as in the
    two-class false-certificate case): the audit counts it, lists its reason and frames it in red."""
    import torch

    import fedleak.audit.run as run_module

    def lying_attack(net, update, attack="exclusivity", defense=None, **options):  # reconstruct_aware's signature
        x, y = captured["x"], captured["y"]
        blend = 0.5 * x[0] + 0.5 * x[1]
        rec = fedleak.Reconstruction(inputs=torch.cat([x, blend[None] + 0.7]), labels=torch.cat([y, y[:1]]),
                                     certified=torch.ones(len(x) + 1, dtype=torch.bool), attack="lying")
        return rec, None

    captured = {}
    real_update = run_module.defended_gradient

    def capture(net, x, y, defenses, seed=0, **loss):
        captured["x"], captured["y"] = x, y
        return real_update(net, x, y, defenses, seed=seed, **loss)

    monkeypatch.setattr(run_module, "reconstruct_aware", lying_attack)
    monkeypatch.setattr(run_module, "defended_gradient", capture)
    result = run_audit(AuditSettings(data="digits", widths=(32,), batch_sizes=(3,), seed=1))
    (row,) = result.summary_rows()
    assert row["false_certificates"] == 1 and row["recovered_fraction"] == 1.0
    (batch,) = result.batches
    assert batch.certificates["certified_false"] == [False, False, False, True]
    assert "matches no original" in batch.certificates["certified_reason"][3]
    (show,) = result.showcases
    assert show.status == ("certified", "certified", "certified", "false") and show.labels[3] == -1
    assert float(np.nanmax(show.rebuilt)) > 1.0  # shown unclamped (0.7 above the blend)
    results, report = write_audit(result, tmp_path / "out")
    page = report.read_text()
    assert "1 FALSE CERTIFICATE(S)" in page and "False certificates</h2>" in page and "matches no original" in page
    payload = json.loads(results.read_text())
    assert payload["batches"][0]["false_certificates"] == 1 and payload["data"]["value_range"] == [0.0, 1.0]


def test_a_scenario_that_cannot_work_on_the_model_is_refused_before_any_batch(monkeypatch):
    """Fishing Flower's Net (whose max-pooled conv layers have fewer outputs than inputs) cannot certify anything:
    the audit says so before its plain batches run, not after them."""
    from fedleak.audit import run as audit_run
    from fedleak.models.flower import FlowerNet

    attacked = []
    monkeypatch.setattr(audit_run, "reconstruct_aware", lambda *a, **k: attacked.append(1))
    torch.manual_seed(0)
    settings = AuditSettings(data="retina", batch_sizes=(1, 2), scenarios=("plain", "fished"))
    with pytest.raises(fedleak.FedleakError, match="fishing cannot make any sample of this model certifiable"):
        run_audit(settings, model=FlowerNet().eval())
    assert not attacked


def test_a_model_whose_updates_the_exact_attack_never_certifies_is_audited_by_auto():
    """Flower's quickstart Net: its max-pooled conv layers have fewer outputs than inputs, so no sample is ever
    certifiable. The audit's default attack certifies nothing there ("nothing rebuilt" would read as no
    leakage): it runs 'auto', whose IG estimates say what the update shows, and its note says why."""
    from fedleak.models.flower import FlowerNet

    torch.manual_seed(0)
    result = run_audit(AuditSettings(data="retina", batch_sizes=(1,), trials=1, budget=3), model=FlowerNet().eval())
    (note,) = result.notes
    assert "no input of this model can be certified at any batch size" in note and "the audit ran 'auto'" in note
    (batch,) = result.batches
    assert batch.certifiable == 0 and batch.certified == 0 and batch.rebuilt == 1 and np.isfinite(batch.mean_psnr)


def test_a_model_the_exclusivity_analysis_does_not_read_is_audited_by_the_other_attacks(tmp_path):
    """A GELU model: the ExAN condition is not counted (None, "n/a" in the report, a note saying why, not a count
    of 0); the audit's default, the exclusivity attack, gives way to 'auto' (as a federation's honest server does),
    and 'first-layer' audits it as asked."""
    from user_models import GeluMLP

    model = GeluMLP(64, 256, 10).eval()
    by_default = run_audit(AuditSettings(data="digits", batch_sizes=(1,), trials=1, budget=2), model=model)
    assert by_default.batches[0].recovered == 1 and by_default.batches[0].certifiable is None
    assert any("the audit ran 'auto'" in n for n in by_default.notes)
    settings = AuditSettings(data="digits", batch_sizes=(1, 2), trials=2, attack="first-layer")
    result = run_audit(settings, model=model)
    by_size = {r["batch_size"]: r for r in result.summary_rows()}
    assert by_size[1]["recovered_fraction"] == 1.0 and by_size[2]["recovered_fraction"] == 0.0
    assert by_size[1]["certifiable_fraction"] is None
    assert all(b.certifiable is None and b.exan_counts == [] for b in result.batches)
    assert any("does not read this model" in n and "gelu" in n for n in result.notes)
    assert not any("the audit ran 'auto'" in n for n in result.notes)
    assert all(b.false_certificates == 0 for b in result.batches)
    write_audit(result, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "n/a" in html and "The ExAN condition was not counted" in html
    assert "certified 100% (2 of 2) at batch 1" in html


def test_normalised_data_is_audited_as_its_model_sees_it_and_said_so(digits):
    """Data stated normalised (a folder's normalization.json, an .npz's mean/std): the note names the map, the
    certified samples are exact in pixel space, and the counts are those of the data as the model sees it."""
    seen = digits.normalized(0.5, 0.25)
    result = run_audit(AuditSettings(data="digits", widths=(256,), batch_sizes=(2,), seed=4), dataset=seen)
    assert any("(x - mean) / std with mean [0.5] and std [0.25]" in n for n in result.notes)
    assert result.value_range == (0.0, 1.0)  # scores on the pixels
    row = result.summary_rows()[0]
    assert row["recovered_fraction"] == 1.0 and row["false_certificates"] == 0
    plain = run_audit(AuditSettings(data="digits", widths=(256,), batch_sizes=(2,), seed=4))
    assert not any("(x - mean) / std" in n for n in plain.notes)


def test_normalised_data_is_searched_on_its_own_range(digits):
    """Data normalised as Flower's quickstart normalises it ([-1, 1]) and a model the exact attack cannot read (GELU):
    the audit's auto searches inside the data's range, where IG searched [0, 1] (mean PSNR 8.6 dB on this batch,
    scored in pixels), which holds none of its background pixels (70 dB in 2 s on an idle machine; a time budget,
    so the bound leaves room for a busy one)."""
    from user_models import GeluMLP

    torch.manual_seed(0)
    result = run_audit(AuditSettings(data="digits", batch_sizes=(2,), trials=1, budget=3, seed=0),
                       dataset=digits.normalized(0.5, 0.5), model=GeluMLP(64, 64, 10).eval())
    assert any("the audit ran 'auto'" in n for n in result.notes)
    assert result.summary_rows()[0]["mean_psnr"] > 20


def test_the_attack_reads_the_data_s_shape_where_the_model_fits_several():
    """A stride-2 convolution whose layers fit 25 x 25 and 26 x 26 images: inferred, the shape would be 26 x 26
    (the one the stride halves); the audit knows its data's, 25 x 25 LFW faces, and the attack reads them (it
    rebuilt 26 x 26 images, which the scoring refused)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 13 * 13, 256), nn.ReLU(), nn.Linear(256, 2)).eval()
    assert fedleak.nets.input_shape_of(model)[0] == (1, 26, 26)
    result = run_audit(AuditSettings(data="lfw", batch_sizes=(4,), trials=1, seed=0), model=model)
    assert result.batches[0].rebuilt >= 1 and result.batches[0].false_certificates == 0
