"""Client defenses in an audited federation: one registry (fedleak.defenses), validated with the settings, run by
the client's local round, Flower's own DP run as Flower's mods and strategy wrapper, (ε, δ) in results.json."""

import json
import math
import time

import numpy as np
import pytest
import torch

import fedleak
from fedleak.defenses.accounting import gaussian_epsilon
from fedleak.errors import OptionError
from fedleak.federation import FederationSettings

pytest.importorskip("flwr")
pytest.importorskip("ray")

SMALL = {"data": "digits", "hidden": (32,), "batch_size": 8, "test_size": 200, "public_size": 100}


def _norm(tensors) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in tensors.values()))


def test_settings_check_the_defenses_before_anything_starts():
    with pytest.raises(OptionError, match="unknown defense 'topk'"):
        FederationSettings(defenses=("topk:ratio=0.1",))
    with pytest.raises(OptionError, match="ratio"):
        FederationSettings(defenses=("top-k:ratio=2",))
    with pytest.raises(OptionError, match="put them last"):  # Flower's mods act after the local round
        FederationSettings(defenses=("local-dp + top-k:ratio=0.1",))
    s = FederationSettings(defenses=("top-k:ratio=0.1", "mixup + local-dp:clip=0.5"))
    assert s.stack.label == "top-k(ratio=0.1) + mixup + local-dp(clip=0.5)"
    assert s.upload == "weights"  # Flower's DP mods clip reply - sent: weights, not an uploaded change
    assert FederationSettings(defenses=("top-k:ratio=0.1",)).upload == "delta"
    assert FederationSettings.from_json(s.to_json()) == s and json.loads(s.to_json())["defenses"] == list(s.defenses)


def test_a_client_of_data_normalised_per_channel_keeps_every_channel_in_range(tmp_path):
    """Colour patches the model sees normalised per channel (an ``.npz`` with ``mean``/``std``, channels far apart):
    the fishing the server ships and the client's InstaHide keep each channel inside the pixels' range (InstaHide
    flipped around the middle of the channels' union left 8,274 values outside)."""
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model

    retina = fedleak.load_dataset("retina")
    mean, std = (0.1, 0.5, 0.9), (0.1, 0.3, 0.5)
    np.savez(tmp_path / "colour.npz", x=retina.x[:400].numpy(), y=retina.y[:400].numpy(), mean=mean, std=std)
    norm = fedleak.normalization(mean, std)
    for threat, specs in (("fishing", ()), ("honest", ("instahide",))):
        s = FederationSettings(data=str(tmp_path / "colour.npz"), hidden=(256,), batch_size=8, test_size=50,
                               public_size=10, threat=threat, defenses=specs)
        split = data_split(s.data, s.test_size, s.public_size)
        assert split.normalization == norm
        done = local_update(make_model(s, split), s, partition_id=0, server_round=1)
        pixels = norm.invert(done.inputs.double())
        assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
        assert not torch.equal(done.inputs, done.original)  # fished (or mixed) indeed


def test_the_client_round_runs_its_defenses_but_leaves_flowers_to_flower():
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model

    def update(*specs):
        s = FederationSettings(**SMALL, defenses=specs)
        model = make_model(s, data_split(s.data, s.test_size, s.public_size))
        return local_update(model, s, partition_id=0, server_round=1)

    plain = update()
    top = update("top-k:ratio=0.1")
    kept = sum(int((v != 0).sum()) for v in top.delta.values())
    assert kept == round(0.1 * sum(v.numel() for v in top.delta.values()))  # global top-k of the round's change
    assert top.sent_bytes < 4 * sum(v.numel() for v in top.delta.values())  # its sparse encoding
    for k, v in top.delta.items():  # the kept entries are the plain client's, unchanged
        assert torch.equal(v[v != 0], plain.delta[k][v != 0])
    mixed = update("mixup")
    assert mixed.labels.shape == (8, 10) and torch.allclose(mixed.labels.sum(1), torch.ones(8))  # soft labels
    flower = update("local-dp:clip=0.001")  # the ClientApp's LocalDpMod clips and noises, not local_update
    for k in plain.delta:
        assert torch.equal(flower.delta[k], plain.delta[k])
    again = update("mixup")
    assert torch.equal(again.inputs, mixed.inputs)  # randomised defenses are seeded


def test_flower_dp_is_realised_by_flowers_mods_and_wrapper():
    from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    from fedleak.federation.flower_native import client_mods
    from fedleak.federation.server_app import build_strategy

    s = FederationSettings(**SMALL, clients=2, audit_mode="sync",
                           defenses=("top-k:ratio=0.5", "central-dp:noise_multiplier=0.8,clip=0.3"))
    outer, audit = build_strategy(s)
    assert isinstance(outer, DifferentialPrivacyClientSideFixedClipping) and outer.strategy is audit
    assert (outer.noise_multiplier, outer.clipping_norm, outer.num_sampled_clients) == (0.8, 0.3, 2)
    assert client_mods(s.stack) == [fixedclipping_mod]
    assert audit.plan.defense.label == s.stack.label  # the server's attack is told the clients' defenses
    (mod,) = client_mods(FederationSettings(defenses=("local-dp:clip=0.2,epsilon=3",)).stack)
    assert isinstance(mod, LocalDpMod) and (mod.clipping_norm, mod.sensitivity, mod.epsilon) == (0.2, 0.4, 3.0)
    plain, _ = build_strategy(FederationSettings(**SMALL, clients=2, audit_mode="sync"))
    assert plain.plan.defense is None


def test_the_client_app_runs_localdpmod_on_its_reply():
    """The ClientApp fedleak builds, called as Flower calls it: its reply is clipped and noised by LocalDpMod."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from fedleak.federation.client_app import SETTINGS_KEY, make_client_app
    from fedleak.federation.flower_native import client_side
    from fedleak.federation.settings import data_split, make_model

    s = FederationSettings(**SMALL, clients=2, defenses=("local-dp:clip=0.01,epsilon=250",))
    assert not client_side(s.stack)
    before = make_model(s, data_split(s.data, s.test_size, s.public_size)).state_dict()
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=3600.0, message_type="train")
    config = ConfigRecord({SETTINGS_KEY: s.to_json(), "server-round": 1})
    msg = Message(RecordDict({"arrays": ArrayRecord(before), "config": config}), metadata=meta)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = make_client_app()(msg, context)
    after = reply.content["arrays"].to_torch_state_dict()
    sent = {k: before[k] - after[k] for k in before}
    defense = s.stack.defenses[0]
    expected = math.sqrt(0.01**2 + sum(v.numel() for v in sent.values()) * defense.noise_std**2)
    assert _norm(sent) == pytest.approx(expected, rel=0.06)
    again = make_client_app()(msg, context).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)  # the mod's numpy noise is seeded per round


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def test_federation_records_the_privacy_of_its_defenses(tmp_path, ray_cluster):
    """`fedleak federate --defense gaussian-noise:... --defense central-dp:...`: (ε, δ) of both in results.json,
    computed for the federation's training; Flower's wrapper ran; the attack was told the defenses."""
    from fedleak.cli import main

    out = tmp_path / "run"
    code = main(["federate", "--clients", "2", "--rounds", "2", "--batch-size", "8", "--widths", "64", "--seed", "0",
                 "--defense", "gaussian-noise:sigma=0.05,clip=1.0", "--defense", "central-dp:noise_multiplier=0.7",
                 "--audit-mode", "thread", "--ray-address", ray_cluster[0], "--out", str(out)])
    assert code == 0 and not _ray_running()
    res = json.loads((out / "results.json").read_text())
    (stack,) = res["defenses"]
    assert stack["stack"] == "gaussian-noise(sigma=0.05, clip=1) + central-dp(noise_multiplier=0.7)"
    assert stack["flower_native"] == ["central-dp(noise_multiplier=0.7)"]
    acc = stack["accounting"]
    assert (acc["rounds"], acc["local_steps"], acc["batch_size"], acc["client_rate"]) == (2, 1, 8, 1.0)
    train = len(fedleak.load_dataset("fashion-mnist")) - 2000  # test and public sets: 1000 each
    assert acc["delta"] == min(1e-5, 1 / train) and acc["dataset_size"] == train // 2  # the smaller partition
    noise, central = stack["privacy"]
    assert noise["epsilon"] == pytest.approx(gaussian_epsilon(0.05, 1.0, 2, 1e-5)) and noise["unit"] == "client"
    assert central["epsilon"] == pytest.approx(gaussian_epsilon(0.7, 1.0, 2, 1e-5))
    assert "Flower central DP" in central["mechanism"]
    assert res["settings"]["upload"] == "weights" and res["settings"]["defenses"] == [
        "gaussian-noise:sigma=0.05,clip=1.0", "central-dp:noise_multiplier=0.7"]
    ok = [r for r in res["records"] if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["defense_aware"] is True for r in ok)
    for r in ok:  # what the server sees: the client's noised change, clipped by fixedclipping_mod to 1.0
        assert r["update_norm"] == pytest.approx(1.0, rel=1e-3) and r["false_certificates"] == 0


def test_local_dp_runs_as_flowers_mod_in_the_simulation(ray_cluster):
    from fedleak.federation import run_federation
    from fedleak.federation.run import summarize

    s = FederationSettings(**SMALL, clients=2, rounds=1, defenses=("local-dp:clip=0.01,epsilon=250",),
                           audit_mode="thread", ray_address=ray_cluster[0])
    result = run_federation(s)
    assert not _ray_running()
    d = s.stack.defenses[0]
    numel = sum(p.numel() for p in fedleak.make_mlp((1, 8, 8), [32], 10).parameters())
    expected = math.sqrt(0.01**2 + numel * d.noise_std**2)  # clipped to 0.01, then N(0, std^2) per entry
    ok = [r for r in result.records if r.status == "ok"]
    assert len(ok) == 2
    for r in ok:
        assert r.update_norm == pytest.approx(expected, rel=0.06) and r.defense_aware is True
    (stack,) = result.defenses
    (p,) = stack.privacy
    assert (p["epsilon"], p["delta"]) == (250.0, 1e-5)
    assert any(line.startswith("defense local-dp(") and "epsilon 250" in line for line in summarize(result))


def test_a_federation_says_what_a_defense_without_certificates_still_leaks(tmp_path, ray_cluster, capsys):
    """Half-precision uploads: nothing certified, and the round's line says what was rebuilt all the same (before it
    read "certified and exact 0.0%" alone)."""
    from fedleak.cli import main

    code = main(["federate", "--data", "digits", "--clients", "2", "--rounds", "1", "--widths", "256", "--seed", "0",
                 "--local-steps", "1", "--defense", "half-precision", "--audit-mode", "thread", "--ray-address",
                 ray_cluster[0], "--out", str(tmp_path / "run")])
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("round 1:"))
    assert code == 0 and "certified and exact 0.0%" in line
    assert "2 update(s) with nothing certified rebuilt uncertified at an estimated" in line
    assert float(line.split("estimated ")[1].split(" dB")[0]) >= 40
