"""Audited clients compute their updates as training loops do (model.train()), or in eval mode where asked."""

import pytest
import torch
from user_models import DropoutMLP

import fedleak
from fedleak.audit import AuditSettings, run_audit


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_model_with_dropout_is_audited_as_its_clients_run_it(digits, mode):
    torch.manual_seed(0)
    model = DropoutMLP(64, 512, 10).eval()
    result = run_audit(AuditSettings(data="digits", batch_sizes=(4,), trials=2, client_mode=mode, budget=1),
                       model=model)
    assert not model.training  # the server's model is left in eval mode
    assert all(b.false_certificates == 0 for b in result.batches)
    recovered = sum(b.recovered for b in result.batches)
    certifiable = sum(b.certifiable for b in result.batches)
    if mode == "train":  # dropped units: nothing the exact methods prove, and nothing counted as provable;
        assert recovered == 0 and certifiable == 0  # so the audit ran 'auto', whose estimates say what leaks
        assert len(result.notes) == 2 and "Dropout 'dropout'" in result.notes[0]
        assert "the audit ran 'auto'" in result.notes[1] and "Dropout" not in result.notes[1]  # said once
        assert all(b.rebuilt == 4 and b.mean_psnr == b.mean_psnr for b in result.batches)  # IG's estimates
    else:
        assert recovered >= 4 and certifiable >= recovered and result.notes == ()


def test_a_model_without_dropout_or_batch_norm_is_the_same_in_both_modes(digits):
    model = fedleak.make_mlp(digits.input_shape, [512], 10, seed=0)
    runs = [run_audit(AuditSettings(data="digits", batch_sizes=(4,), trials=1, client_mode=mode), model=model)
            for mode in ("train", "eval")]
    assert [b.recovered for b in runs[0].batches] == [b.recovered for b in runs[1].batches]
    assert runs[0].notes == runs[1].notes == ()
    with pytest.raises(fedleak.FedleakError, match="client_mode must be train or eval"):
        AuditSettings(client_mode="inference")
