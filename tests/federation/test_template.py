"""The audit's model template on its way to the worker process (fedleak.federation.template): a model whose layers
are under weight normalisation, which torch does not pickle, arrives as it was sent."""

import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from fedleak.federation.template import check_shippable, shipped, traced_copy


def _normed(form: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrap = nn.utils.parametrizations.weight_norm if form == "parametrization" else nn.utils.weight_norm
        model = nn.Sequential(nn.Flatten(), wrap(nn.Linear(64, 32)), nn.ReLU(), wrap(nn.Linear(32, 10), dim=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("original0", "weight_g")):
                p.mul_(1.5)
    return model.eval()


@pytest.mark.parametrize("form", ["parametrization", "hook"])
def test_a_weight_normalised_template_arrives_as_it_was_sent(form):
    template = traced_copy(_normed(form))
    if form == "parametrization":
        with pytest.raises(RuntimeError, match="parametrized modules"):  # torch's own refusal
            pickle.dumps(template)
    check_shippable(shipped(template), "the traced model")
    arrived = pickle.load(io.BytesIO(pickle.dumps(shipped(template)))).arrived()
    sent, got = template.state_dict(), arrived.state_dict()
    assert sent.keys() == got.keys() and all(torch.equal(sent[k], got[k]) for k in sent)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(arrived(x), template(x))
    assert [n for n, p in arrived.named_parameters() if p.requires_grad] == \
        [n for n, p in template.named_parameters() if p.requires_grad]
    assert template.state_dict().keys() == sent.keys()  # the template itself is not changed
