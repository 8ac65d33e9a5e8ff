"""``fedleak check``: the plan on the command line."""

from __future__ import annotations

import json

import pytest

import fedleak
from fedleak.cli import main


def test_flower_cnn_explains_per_block_why_and_what_would_change(capsys):
    assert main(["check", "--model", "flower-cnn"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("VERDICT: the exact route cannot apply to flower-cnn")
    assert "measured on" in out and "retina" in out  # the built-in model's own data set, said
    # per block: conv2's pooled equations against its unknowns, in numbers
    assert "conv2: 16 channels x 5 x 5 after 2x2 max pooling give at most 400 equations" in out
    assert "for 1176 unknowns (6 x 14 x 14): underdetermined" in out
    assert "conv1: 6 channels x 14 x 14 after 2x2 max pooling give at most 1176 equations" in out
    # and what would make it apply, computed
    change = out[out.index("Changes toward batches of 32"):]
    assert "conv2: remove the 2x2 pooling after it and use" in change and "channels (16 now)" in change
    assert "+ ig" in out and "- exclusivity" in out


def test_json_and_a_captured_update(tmp_path, capsys, digits):
    model = fedleak.make_mlp((1, 8, 8), [1024], 10, seed=0)
    x, y = digits.batch(8, seed=0)
    fedleak.save_mlp(model, tmp_path / "model.safetensors")
    fedleak.save_update(fedleak.compute_gradient_update(model, x, y), tmp_path / "update.safetensors")
    target = tmp_path / "plan.json"
    code = main(["check", "--model", str(tmp_path / "model.safetensors"), "--update",
                 str(tmp_path / "update.safetensors"), "--data", "digits", "--batch-sizes", "4,8", "--json",
                 str(target)])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("VERDICT: the exact route applies to model.safetensors")
    payload = json.loads(target.read_text())
    plan = payload["plan"]
    assert payload["kind"] == "fedleak-plan" and payload["data"] == "digits"
    assert plan["update"]["kind"] == "gradient" and plan["batch_size"] == 8
    assert [e["batch_size"] for e in plan["estimates"]] == [4, 8]
    assert plan["dense"][0]["width"] == 1024 and plan["route"] == "applies"
    assert plan["attacks"][0]["name"] == "exclusivity" and plan["attacks"][0]["recommended"]
    assert f"wrote {target}" in out
    assert not list(tmp_path.glob(".plan.json.tmp*"))


def test_a_users_class_file(tmp_path, capsys):
    source = tmp_path / "net.py"
    source.write_text("import torch.nn as nn\n\nclass Tiny(nn.Module):\n    def __init__(self):\n"
                      "        super().__init__()\n        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), "
                      "nn.ReLU(), nn.Linear(300, 10))\n\n    def forward(self, x):\n        return self.body(x)\n")
    assert main(["check", "--model", f"{source}:Tiny", "--data", "digits", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "Tiny" in out.splitlines()[0] and "body.1" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "mlp", "--batch-sizes", "a,b"], "--batch-sizes must be comma-separated"),
    (["--model", "mlp", "--batch-size", "0"], "--batch-size must lie in"),
    (["--model", "mlp", "--data", "lfw"], "does not run on inputs of shape (1, 25, 25)"),
    (["--model", "mlp", "--update", "/no/such.safetensors"], "update file not found"),
    (["--model", "mlp", "--json", "/no/such/dir/plan.json"], "does not exist"),
])
def test_bad_input_is_one_line(capsys, args, message):
    assert main(["check", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error:") and message in err and err.count("\n") == 1
