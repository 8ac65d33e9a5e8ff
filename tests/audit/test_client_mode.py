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


def test_batch_size_one_is_left_out_where_batch_norm_cannot_train_on_it(digits):
    # BatchNorm1d over a dense layer: torch refuses one sample in training mode, as it would refuse the client
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    running = model[2].running_mean.clone()
    result = run_audit(AuditSettings(data="digits", batch_sizes=(1, 4), trials=1, budget=1), model=model)
    assert result.settings.batch_sizes == (4,) and [b.batch_size for b in result.batches] == [4]
    assert "batch size 1 is not audited" in result.notes[-1] and "BatchNorm" in result.notes[-1]
    assert torch.equal(model[2].running_mean, running)  # the probe and the clients left the statistics as they were
    with pytest.raises(fedleak.OptionError, match="audit batch sizes of 2 or more, or clients in eval mode"):
        run_audit(AuditSettings(data="digits", batch_sizes=(1,), trials=1), model=model)
    # in eval mode the client computes one sample, and batch size 1 is audited
    result = run_audit(AuditSettings(data="digits", batch_sizes=(1,), trials=1, client_mode="eval"), model=model)
    assert [b.batch_size for b in result.batches] == [1]
