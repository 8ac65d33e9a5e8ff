"""The console summary of a federation run (fedleak.federation.run.summarize)."""

import pytest

from fedleak.federation.results import ClientRecord, FederationResult, RoundRecord, Scores

pytest.importorskip("flwr")


def _record(client, rebuilt, psnr):
    scores = Scores(batch_size=16, recovered=0, recovered_fraction=0.0, psnr=psnr, psnr_original=psnr,
                    label_accuracy=None, false_certificates=0)
    return ClientRecord(1, client, 100 + client, "ok", num_examples=16, attack="exclusivity", rebuilt=rebuilt,
                        scores=scores)


def test_an_update_that_rebuilt_nothing_is_not_counted_as_rebuilt_uncertified():
    """Nothing certified: an update whose attack rebuilt something is summed up by its estimated PSNR; one that
    rebuilt nothing (PSNR NaN) is not counted, and no 'nan dB' is printed."""
    from fedleak.federation.run import summarize

    rounds = (RoundRecord(0, 0.1, 2.3, None, 0, 0), RoundRecord(1, 0.1, 2.3, 1.0, 2, 0))
    for records, expected in (((_record(0, 0, float("nan")), _record(1, 0, float("nan"))), None),
                              ((_record(0, 0, float("nan")), _record(1, 12, 30.0)), "1 update(s) with nothing "
                               "certified rebuilt uncertified at an estimated 30.0 dB PSNR")):
        result = FederationResult({"clients": 2}, {}, rounds, records, 1.0, 0.0)
        (line,) = [line for line in summarize(result) if line.startswith("round 1:")]
        assert "nan" not in line and (expected is None or expected in line), line
        assert "certified and exact 0.0%" in line
