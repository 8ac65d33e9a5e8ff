"""Flower's deployment runtime: a real SuperLink and SuperNodes as separate processes on loopback, per-node data,
ground truth scored by the clients through Flower messages; plus the parts of it that need no daemon."""

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fedleak
from fedleak.errors import DataError, FedleakError, OptionError
from fedleak.federation import FederationSettings

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedleak.federation.ground_truth import TrueBatch, write_true_batch  # noqa: E402
from fedleak.federation.node_data import node_data_of, read_node_data, write_node_data  # noqa: E402
from fedleak.federation.processes import ProcessGroup, alive, free_port, port_open  # noqa: E402

SMALL = dict(data="digits", hidden=(256,), batch_size=8, test_size=200, public_size=100, runtime="deployment")


def _leftover_processes(dirs: set[str]) -> list[int]:
    """Our processes whose environment names one of the run folders ``dirs`` (every daemon's HOME is in it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(d in env for d in dirs) and alive(int(entry)):
                found.append(int(entry))
    return found


def _run_dirs() -> set[str]:
    base = "/tmp" if len(tempfile.gettempdir()) > 24 else tempfile.gettempdir()
    return {os.path.join(base, d) for d in os.listdir(base) if d.startswith("fedleak-dep-")}


def _nothing_left(base: str) -> None:
    """No run folder left in ``base`` (the test's own temp folder) and no process whose environment names it."""
    assert tempfile.gettempdir() == base
    assert not _run_dirs()  # the run's folder (node data, logs, Flower homes) is gone
    assert not _leftover_processes({base})


@pytest.fixture
def server_identity(monkeypatch):
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_node_data_round_trip_and_bad_folder(tmp_path):
    d = fedleak.load_dataset("digits")
    write_node_data(tmp_path / "n", d.x[:30], d.y[:30], num_classes=10, value_range=d.value_range, partition=2)
    node = read_node_data(tmp_path / "n")
    assert torch.equal(node.x, d.x[:30]) and torch.equal(node.y, d.y[:30])
    assert (node.input_shape, node.num_classes, node.partition) == ((1, 8, 8), 10, 2)
    ctx = Context(run_id=1, node_id=5, node_config={"data-dir": str(tmp_path / "n")}, state=RecordDict(),
                  run_config={})
    assert node_data_of(ctx).partition == 2
    assert node_data_of(Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                                run_config={})) is None
    with pytest.raises(DataError, match="holds no data.safetensors"):
        read_node_data(tmp_path / "missing")
    assert node.normalization is None
    norm = fedleak.normalization((0.3,), (0.4,))
    write_node_data(tmp_path / "z", norm.apply(d.x[:30]), d.y[:30], num_classes=10, value_range=norm.input_range,
                    partition=1, normalization=norm)
    assert read_node_data(tmp_path / "z").normalization == norm  # a SuperNode's fishing and defenses work per channel


def test_the_client_scores_the_servers_reconstruction_through_a_message(tmp_path, server_identity):
    """The ClientApp of the deployment app scores what the server rebuilt against the batch the node kept; the
    reply holds numbers only, equal to the scores of the simulation's scorer."""
    from fedleak.federation.deploy_app import client_app
    from fedleak.federation.ground_truth import GroundTruthScorer
    from fedleak.federation.score_channel import ROUNDS_KEY, SCORE_MESSAGE, ReconstructionStash, ScoreRequest

    d = fedleak.load_dataset("digits")
    write_node_data(tmp_path / "node", d.x[:50], d.y[:50], num_classes=10, value_range=d.value_range, partition=0)
    node = read_node_data(tmp_path / "node")
    model = fedleak.make_mlp(d.input_shape, [256], 10, seed=0)
    stash = ReconstructionStash(tmp_path / "server")
    recs = {}
    for rnd, sl in ((1, slice(0, 4)), (2, slice(10, 18))):
        x, y = d.x[sl], d.y[sl]
        write_true_batch(node.truth_dir, rnd, 42, TrueBatch(x, x, y, 0))
        recs[rnd] = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
        stash(ScoreRequest(rnd, 42), recs[rnd])
    content = RecordDict({f"rebuilt-{r}": stash.load(r, 42) for r in (1, 2)})
    content["config"] = ConfigRecord({ROUNDS_KEY: [1, 2]})
    msg = Message(content=content, message_type=SCORE_MESSAGE, dst_node_id=42)
    ctx = Context(run_id=1, node_id=42, node_config={"partition-id": 0, "data-dir": str(tmp_path / "node")},
                  state=RecordDict(), run_config={})
    reply = client_app(msg, ctx)
    assert not reply.has_error()
    assert not list(reply.content.array_records)  # no sample goes back to the server
    from fedleak.federation.score_channel import scores_from

    for rnd in (1, 2):
        got = scores_from(reply.content[f"scores-{rnd}"], reply.content[f"reasons-{rnd}"])
        want = GroundTruthScorer(node.truth_dir, data_range=d.value_range)(ScoreRequest(rnd, 42), recs[rnd])
        assert got.batch_size == want.batch_size and got.recovered == want.recovered
        assert got.false_certificates == want.false_certificates == 0
        assert math.isclose(got.recovered_fraction, want.recovered_fraction)
    assert got.batch_size == 8


def test_result_codec_keeps_every_field():
    from fedleak.federation.result_codec import dump_result, load_result
    from fedleak.federation.results import ClientRecord, FederationResult, RoundRecord, Scores

    scores = Scores(8, 5, 0.625, 87.5, float("nan"), 1.0, 0, false_certificate_reasons=("a blend",),
                    value_range=(0.0, 1.0), ssim=None)
    recs = (ClientRecord(1, 0, 123, "ok", "x", 8, "exclusivity", 8, 5, 0.1, scores, ("n",), "one-step", False, "",
                         None, 2.5), ClientRecord.skipped(1, 1, 456, "failed", "boom"))
    result = FederationResult({"seed": 0, "hidden": [256]}, {"flwr": "1.41.0"},
                              (RoundRecord(0, 0.1, 2.3, None, 0, 0), RoundRecord(1, 0.2, 2.1, 3.0, 1, 1)), recs,
                              12.0, 0.5)
    back = load_result(dump_result(result))
    assert back.records[1] == recs[1] and back.rounds == result.rounds and back.settings == result.settings
    assert back.records[0].scores.false_certificate_reasons == ("a blend",)
    assert math.isnan(back.records[0].scores.psnr_original) and back.records[0].scores.value_range == (0.0, 1.0)
    assert back.to_dict() == result.to_dict()
    with pytest.raises(FedleakError, match="cannot be read"):
        load_result('{"format": "something else"}')


def test_process_group_stops_a_whole_tree_even_in_new_sessions(tmp_path):
    group = ProcessGroup(grace=2)
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'], start_new_session=True)\n"
              "time.sleep(300)\n")
    group.start("parent", [sys.executable, "-c", script], env=dict(os.environ), log=tmp_path / "p.log")
    for _ in range(100):
        if len(group.pids()) == 2:
            break
        subprocess.run(["sleep", "0.1"])
    pids = group.pids()
    assert len(pids) == 2  # the parent and its child in another session, which ignores SIGTERM
    group.stop()
    assert not any(alive(p) for p in pids)


def test_unknown_runtime_and_bad_options():
    with pytest.raises(OptionError, match="unknown runtime 'cloud'"):
        FederationSettings(runtime="cloud")
    from fedleak.federation.deployment import DeploymentOptions, run_deployment

    with pytest.raises(OptionError, match="run_timeout"):
        DeploymentOptions(run_timeout=0)
    with pytest.raises(OptionError, match="node_ports gives 1"):
        run_deployment(FederationSettings(clients=2, **SMALL), options=DeploymentOptions(node_ports=(free_port(),)))


def test_supernodes_as_processes_with_their_own_data(private_tempdir):
    """2 SuperNodes and a SuperLink as separate processes on loopback, one round: a record per node, scored by the
    node itself; nothing left running or listening afterwards. (Flower starts a ClientApp process per message, so
    each round costs seconds here; several rounds run the same server loop as the simulation, and the clients'
    scoring of several rounds in one message is checked above.)"""
    from fedleak.federation.deployment import DeploymentOptions, run_deployment

    ports = [free_port() for _ in range(3)]
    settings = FederationSettings(clients=2, rounds=1, **SMALL)
    result = run_deployment(settings, options=DeploymentOptions(superlink_port=ports[0], node_ports=tuple(ports[1:])))
    assert [r.round for r in result.rounds] == [0, 1]
    by = {(r.round, r.client): r for r in result.records}
    assert sorted(by) == [(1, c) for c in range(2)]
    assert len({r.node_id for r in result.records}) == 2  # two SuperNodes, each with its own partition
    for r in result.records:
        assert r.status == "ok" and r.attack == "exclusivity"
        assert r.scores is not None and r.scores.batch_size == 8 and r.scores.false_certificates == 0
        assert r.scores.preview == ()  # the clients sent numbers, no images of their data
    assert np.mean([r.scores.recovered_fraction for r in result.records]) >= 0.5
    assert result.settings["runtime"] == "deployment"
    assert not any(port_open("127.0.0.1", p) for p in ports)
    _nothing_left(private_tempdir)


def test_a_run_that_fails_stops_everything_with_one_line(private_tempdir):
    from fedleak.federation.deployment import DeploymentOptions, run_deployment

    ports = [free_port() for _ in range(2)]
    with pytest.raises(FedleakError) as err:
        run_deployment(FederationSettings(clients=1, rounds=1, **SMALL),
                       options=DeploymentOptions(superlink_port=ports[0], node_ports=tuple(ports[1:]), run_timeout=1))
    assert "did not finish within 1 s" in str(err.value) and "\n" not in str(err.value)
    assert not any(port_open("127.0.0.1", p) for p in ports)
    _nothing_left(private_tempdir)
