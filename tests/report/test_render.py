"""The report design shared by `fedleak audit`, `fedleak reconstruct` and `fedleak federate`: number formats that
never mislead, a verdict first, every uncertified sample's reason, withheld samples counted as such."""

import html
import math
import re

import numpy as np
import pytest

import fedleak
from fedleak.audit import AuditSettings, available_scenarios, register_scenario, run_audit
from fedleak.federation.results import ClientRecord, FederationResult, RoundRecord, Scores
from fedleak.report.render import environment, percent, psnr_text


def _text(page: str) -> str:
    """The page's visible text, tags removed and whitespace collapsed."""
    body = re.sub(r"<style>.*?</style>", " ", page, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_percent_never_rounds_a_part_to_none_or_to_all():
    assert percent(0.0026) == "<1%" and percent(1e-9) == "<1%"
    assert percent(0.0) == "0%" and percent(0.005) == "<1%" and percent(0.006) == "1%"
    assert percent(0.996) == ">99%" and percent(0.995) == ">99%"
    assert percent(1.0) == "100%" and percent(0.8125) == "81%"
    assert percent(None) == "" and percent(math.nan) == ""


def test_psnr_is_blank_without_samples_and_marks_the_cap():
    assert psnr_text(None) == "" and psnr_text(math.nan) == ""
    assert psnr_text(35.24, 0) == ""  # nothing matched: no number, not "100.0"
    assert psnr_text(35.24, 3) == "35.2" and psnr_text(100.0, 3) == "≥100"


def test_templates_escape_and_use_the_filters():
    env = environment()
    assert env.autoescape
    out = env.from_string("{{ x|pct }} {{ p|psnr(n) }} {{ s }}").render(x=0.0026, p=20.0, n=0, s="<b>")
    assert out == "&lt;1%  &lt;b&gt;"


class KeepEven:
    """A client transform that sends every other sample of its batch (the rest is withheld)."""

    def __call__(self, model, x, y):
        return x[::2], y[::2]


if "keep-even" not in available_scenarios():
    register_scenario("keep-even", "the client sends every other sample")(lambda settings, data: KeepEven())


@pytest.fixture(scope="module")
def audit_page():
    settings = AuditSettings(data="digits", widths=(64,), batch_sizes=(4, 32), scenarios=("plain", "keep-even"),
                             seed=0)
    result = run_audit(settings)
    from fedleak.audit.report import render_html

    return result, render_html(result)


def test_audit_report_starts_with_a_verdict_and_counts_withheld_samples(audit_page):
    result, page = audit_page
    text = _text(page)
    verdict = text.index("Leaks at width 64")
    assert verdict < text.index("What to do") < text.index("Evidence")
    rows = {(r["scenario"], r["batch_size"]): r for r in result.summary_rows()}
    assert rows[("plain", 4)]["recovered_fraction"] == 1.0 and "every sample of batches of 4" in text
    # the client withheld 2 of its 4 samples: counted as withheld, in the table and in the verdict
    batch = next(b for b in result.batches if b.scenario == "keep-even" and b.batch_size == 4)
    assert batch.sent == 2 and batch.withheld["index"] == [1, 3]
    assert "2 of 4 (2 withheld)" in text and "The client withheld 2 of 4 at batch 4" in text
    assert "withheld #1, #3 (2 samples): left out of the update by the client (keep-even)" in text
    assert "What to do" in text and "Batch size." in text


def test_audit_report_gives_every_uncertified_sample_a_reason(audit_page):
    result, page = audit_page
    text = _text(page)
    missing = 0
    for b in result.batches:
        for status, reason in zip(b.per_sample["status"], b.per_sample["reason"]):
            assert status in ("certified", "uncertified", "missing", "false")
            if status != "certified":
                assert reason and reason in text  # listed in the report, word for word
                missing += 1
    assert missing > 0  # at width 64 the batches of 32 leave samples unrecovered
    # the image grids: one card per sample; every non-green frame has its reason's key under it
    assert 'class="frame certified"' in page
    assert 'class="frame missing"' in page or 'class="frame uncertified"' in page
    assert "0%" not in re.findall(r"withheld by the client: no update sent[^<]*", page)


def test_an_exact_route_batch_size_is_advised_from_the_audit(audit_page):
    result, page = audit_page
    plain = [r for r in result.summary_rows() if r["scenario"] == "plain"]
    safe = next((r["batch_size"] for r in plain if r["certifiable_fraction"] < 0.01), None)
    text = _text(page)
    if safe is None:
        assert "No audited batch size stays outside the exact route at width 64" in text
    else:
        assert f"From batch {safe} on, fewer than 1% of the samples were certifiable" in text
    assert "Not measured in this audit" in text  # no defended scenario was audited


def test_reconstruction_report_counts_certified_of_inferred_and_says_why(tmp_path, digits):
    from fedleak.report.reconstruction import ReconstructionRun, render_reconstruction

    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(32, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert 0 < rec.num_certified < len(rec) <= 32  # partially certified
    page = render_reconstruction(ReconstructionRun(rec, tuple(model.input_shape), "m.safetensors", "u.safetensors",
                                                   "exclusivity"))
    text = _text(page)
    headline = f"{rec.num_certified} of the {rec.batch_size} inferred sample(s) certified"
    assert text.index(headline) < text.index("Every sample")
    for s in rec.samples:
        assert s.reason in text
    if rec.batch_size > len(rec):
        assert f"{rec.batch_size - len(rec)} of the {rec.batch_size} inferred sample(s)" in text
    assert page.count('class="frame uncertified"') == len(rec) - rec.num_certified


def test_a_record_of_features_shows_its_values(tmp_path):
    """Tabular data: each card's record is drawn as a strip, and pointing at it reads its feature values, the
    original's and the rebuilt one's; images get no such text."""
    from fedleak.report.grid import record_values
    from fedleak.report.reconstruction import ReconstructionRun, render_reconstruction

    assert record_values(np.array([[[39.0, 0.25, -1.5]]])) == "39, 0.25, -1.5"
    assert record_values(np.arange(20.0)).endswith("15, ... (20 features)")
    assert record_values(np.zeros((1, 8, 8))) == "" and record_values(None) == ""
    table = tmp_path / "t.csv"
    table.write_text("a,b,c,label\n" + "".join(f"{i / 10},{1 - i / 10},{(i % 3) / 4},{i % 2}\n" for i in range(9)))
    data = fedleak.load_dataset(table)
    model = fedleak.make_mlp(data.input_shape, [64], 2, seed=0)
    x, y = data.batch(1, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert rec.num_certified == 1
    page = render_reconstruction(ReconstructionRun(rec, tuple(model.input_shape), "m.safetensors", "u.safetensors",
                                                   "exclusivity"))
    values = ", ".join(f"{v:.6g}" for v in rec.inputs[0].flatten().tolist())
    assert f'title="rebuilt by the server: {values}"' in page and "point at it to read their values" in page


def _scores(batch: int, recovered: int, preview) -> Scores:
    return Scores(batch, recovered, recovered / batch, 100.0, 100.0, 0.9, 0, tuple(preview), value_range=(0.0, 1.0))


def test_federation_report_tells_clients_apart_and_counts_withheld_samples():
    img = np.zeros((1, 8, 8), dtype=np.float32)
    preview = [(img, img, "certified", ""), (img, img + 0.5, "uncertified", "only 1 verified exclusive neuron(s)"),
               (img, None, "", "")]
    records = (
        ClientRecord(1, 0, 8764123456789, "ok", "d", 8, "exclusivity", 6, 4, 0.1, _scores(8, 4, preview)),
        ClientRecord(1, -1, 5550001112223, "ok", "d", 8, "exclusivity", 3, 3, 0.1, _scores(5, 3, preview[:1])),
        ClientRecord(1, -1, 4440001112223, "failed", "injected failure"),
    )
    assert records[1].client_id == 5550001112223 and records[1].client_label == "node 555000…"
    assert records[0].client_id == 0 and records[0].client_label == "partition 0"
    assert records[1].to_dict()["client_id"] == 5550001112223 and records[1].to_dict()["client"] == -1
    result = FederationResult({"threat": "honest", "defense": "exclusivity-reduction", "batch_size": 8,
                               "local_steps": 1, "local_epochs": 0, "data": "digits"}, {"fedleak": "test"},
                              (RoundRecord(0, 0.1, 2.3, None, 0, 0), RoundRecord(1, 0.4, 1.9, 2.0, 2, 1)),
                              records, 3.0, 0.0)
    from fedleak.federation.report import render_report

    text = _text(render_report(result))
    assert text.index("certified 50%–60% of the samples in each client's update") < text.index("Rounds")
    assert "5 of 8 (3 withheld)" in text and "withheld 3 of 8 samples in 1 update" in text
    assert "only 1 verified exclusive neuron(s)" in text and "not rebuilt by the attack" in text
    assert "node 555000…" in text and "partition 0" in text and "-1" not in text.split("Settings")[0]
    assert "est." in text and "estimated, uncertified" in text  # 2 uncertified samples in partition 0's PSNR
    assert "1 client update not attacked: failed" in text
