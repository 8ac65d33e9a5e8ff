"""The model's device: analysis, the exact attack and fishing run where the model lives (CUDA if there is one)."""

import pytest
import torch
from user_models import DropoutMLP

import fedleak

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _model():
    torch.manual_seed(0)
    return DropoutMLP(64, 256, 10).eval()


def test_network_reports_the_models_device_and_dtype():
    net = fedleak.as_network(_model())
    assert net.device == torch.device("cpu") and net.dtype == torch.float32


@cuda
def test_cuda_model_gives_the_cpu_results(digits):
    x, y = digits.batch(8, seed=0)
    cpu = _model()
    gpu = _model().cuda()
    net = fedleak.as_network(gpu)
    assert net.device.type == "cuda"
    report_cpu = fedleak.analyze_exclusivity(cpu, x, y)
    report_gpu = fedleak.analyze_exclusivity(gpu, x.cuda(), y.cuda())
    assert report_gpu.certifiable.tolist() == report_cpu.certifiable.tolist()
    rec_cpu = fedleak.reconstruct(cpu, fedleak.compute_gradient_update(cpu, x, y), attack="exclusivity")
    rec_gpu = fedleak.reconstruct(gpu, fedleak.compute_gradient_update(gpu, x.cuda(), y.cuda()), attack="exclusivity")
    assert rec_gpu.num_certified == rec_cpu.num_certified > 0
    scores = fedleak.metrics.match(rec_gpu, x, y)
    assert scores.false_certificates == 0 and int(scores.recovered.sum()) == rec_cpu.num_certified
    fished = fedleak.fish(gpu, x.cuda(), y.cuda())
    assert fished.inputs.device.type == "cpu" and fished.inputs.shape == x.shape
