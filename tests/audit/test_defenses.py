"""Defenses as audit scenarios: each spec is a scenario named by its stack's label, its client is
defended_gradient, its bytes, time and (ε, δ) are recorded, and defense-aware attacks are told the stack."""

import json

import pytest

import fedleak
from fedleak.audit import AuditSettings, run_audit, write_audit
from fedleak.defenses.accounting import gaussian_epsilon


@pytest.fixture(scope="module")
def audited():
    settings = AuditSettings(data="digits", widths=(128,), batch_sizes=(2, 8), seed=0,
                             defenses=("top-k:ratio=0.1", "mixup", "gaussian-noise:sigma=0.5,clip=1"))
    return run_audit(settings)


def test_each_defense_is_a_scenario_named_by_its_label(audited):
    names = ("plain", "top-k(ratio=0.1)", "mixup", "gaussian-noise(sigma=0.5, clip=1)")
    assert audited.settings.scenario_names == names
    assert [r["scenario"] for r in audited.summary_rows()] == [n for n in names for _ in (2, 8)]
    assert set(audited.reconstructable_batch_size()) == set(names)
    assert "Zhang et al." in audited.descriptions["mixup"] and "top-k" in audited.descriptions["top-k(ratio=0.1)"]
    rows = {(r["scenario"], r["batch_size"]): r for r in audited.summary_rows()}
    assert rows[("plain", 2)]["recovered_fraction"] == 1.0  # the undefended client leaks at batch 2
    assert all(r["false_certificates"] == 0 for r in rows.values())


def test_the_defended_client_is_recorded(audited):
    by = {(b.scenario, b.batch_size): b for b in audited.batches}
    plain, top = by[("plain", 8)], by[("top-k(ratio=0.1)", 8)]
    dense = sum(p.numel() for p in fedleak.make_mlp((1, 8, 8), [128], 10).parameters())
    assert plain.sent_bytes == 4 * dense and top.sent_bytes < plain.sent_bytes / 4  # top-k's sparse encoding
    assert plain.defense_aware is None and top.defense_aware is True  # the exclusivity attack modelled top-k
    assert all(b.client_seconds > 0 for b in audited.batches)
    assert plain.privacy == [] and top.privacy == []  # neither gives a formal guarantee
    (p,) = by[("gaussian-noise(sigma=0.5, clip=1)", 8)].privacy
    assert p["unit"] == "client" and p["epsilon"] == pytest.approx(gaussian_epsilon(0.5, 1.0, 1, 1e-5))
    mixed = by[("mixup", 8)]
    assert mixed.sent == 8 and mixed.perturbation_psnr is not None  # mixtures sent, scored against originals too
    assert plain.perturbation_psnr is None and top.perturbation_psnr is None  # the batch itself unchanged


def test_results_json_carries_the_defenses(audited, tmp_path):
    results, report = write_audit(audited, tmp_path)
    payload = json.loads(results.read_text())
    assert payload["settings"]["defenses"] == ["top-k:ratio=0.1", "mixup", "gaussian-noise:sigma=0.5,clip=1"]
    rows = {(r["scenario"], r["batch_size"]): r for r in payload["summary"]}
    assert rows[("gaussian-noise(sigma=0.5, clip=1)", 2)]["privacy"][0]["accountant"] == "opacus-rdp"
    assert rows[("top-k(ratio=0.1)", 2)]["sent_bytes"] < rows[("plain", 2)]["sent_bytes"]
    assert report.read_text().startswith("<!doctype html>")


def test_a_defense_that_withholds_everything_sends_nothing():
    # exclusivity reduction with drop_unprotected may leave out samples it cannot protect; whatever it sends, the
    # audit counts the rest as withheld and never as recovered
    result = run_audit(AuditSettings(data="digits", widths=(64,), batch_sizes=(4,), scenarios=(),
                                     defenses=("exclusivity-reduction",)))
    (b,) = result.batches
    assert b.scenario == "exclusivity-reduction" and b.sent + len(b.withheld["index"]) == 4
    assert b.recovered == 0 and b.false_certificates == 0


def test_bad_defense_settings():
    with pytest.raises(fedleak.FedleakError, match="unknown defense 'topk'"):
        AuditSettings(defenses=("topk",))
    with pytest.raises(fedleak.FedleakError, match="ratio"):
        AuditSettings(defenses=("top-k:ratio=0",))
    with pytest.raises(fedleak.FedleakError, match="given twice"):
        AuditSettings(defenses=("mixup", "mixup:k=2"))
    with pytest.raises(fedleak.FedleakError, match="unknown scenario 'defended'"):  # the old hard-wired scenario
        run_audit(AuditSettings(widths=(8,), batch_sizes=(1,), scenarios=("defended",)))
