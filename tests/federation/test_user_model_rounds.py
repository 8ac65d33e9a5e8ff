"""AuditFedAvg audits rounds of models as users write them (Flower's quickstart ``Net``, an MLP class with
Dropout, a model with BatchNorm), their clients written as Flower's quickstart writes them.

The strategy is driven by Flower's own round loop (``Strategy.start``) over a loopback Grid whose nodes run
a real ``flwr`` ClientApp: every message, record and reply is a real Flower object. In the worker process the
model is rebuilt without the user's class (here the class claims to live in the script being run, ``__main__``,
which the worker never imports).
"""

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F
from user_models import DropoutMLP, FlowerNet, in_main

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedleak.federation.ground_truth import GroundTruthScorer, TrueBatch, write_true_batch  # noqa: E402
from fedleak.federation.strategy import AuditFedAvg, AuditPlan  # noqa: E402

LR = 0.1


class LoopbackGrid(Grid):
    """A Grid whose nodes are in this process: each message goes to ``client_app(message, context)``."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": k}, state=RecordDict(),
                                       run_config={}) for k, node in enumerate(range(101, 101 + num_nodes))}
        self._run = None
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError  # the strategy only calls send_and_receive

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        return [self.client_app(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]


def one_step_client(make_model, batches, truth_dir, *, weights: bool = False, report_lr: bool = False) -> ClientApp:
    """A ClientApp as a user writes one: load the sent weights into its own model class, take one SGD step on
    its batch and reply with the change (``lr * gradient``; ``weights``: its new weights, as Flower's quickstart
    does, from ``torch.optim.SGD``) and ``num-examples`` (``report_lr``: and ``learning-rate``). For evaluation only
    it also writes the batch to ``truth_dir`` (never in a message; the attack does not read it)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config["partition-id"])
        x, y = batches[pid]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        delta = {name: (LR * p.grad).detach() for name, p in model.named_parameters()}
        if weights:
            torch.optim.SGD(model.parameters(), lr=LR).step()
        server_round = int(msg.content["config"]["server-round"])
        write_true_batch(truth_dir, server_round, context.node_id, TrueBatch(x, x, y, pid, (0.0, 1.0)))
        metrics = MetricRecord({"num-examples": len(x), "partition-id": pid, **({"learning-rate": LR} if report_lr
                                                                                 else {})})
        arrays = ArrayRecord(model.state_dict() if weights else delta)
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower's ServerApp runtime sets before ``main`` runs: the messages a strategy creates carry it."""
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def run_audited(model_fn, batches, audit_mode, tmp_path, train_config=None, **client):
    model = model_fn()
    strategy = AuditFedAvg(model, AuditPlan("exclusivity", {"known_scale": False}), audit_mode=audit_mode,
                           upload="weights" if client.get("weights") else "delta", scorer=GroundTruthScorer(tmp_path),
                           fraction_evaluate=0.0, min_available_nodes=len(batches))
    grid = LoopbackGrid(one_step_client(model_fn, batches, str(tmp_path), **client), len(batches))
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1,
                                train_config=train_config)
        records = strategy.findings()
    finally:
        strategy.close()
    assert len(grid.sent) == len(batches) and result.arrays is not None
    return strategy, records


@pytest.mark.parametrize("audit_mode", ["sync", "process"])
def test_dropout_mlp_class_is_audited_and_samples_certified(digits, audit_mode, tmp_path, monkeypatch,
                                                            server_identity):
    cls = in_main(DropoutMLP, monkeypatch) if audit_mode == "process" else DropoutMLP
    batches = [(digits.x[k * 8:(k + 1) * 8], digits.y[k * 8:(k + 1) * 8]) for k in range(2)]

    def model_fn():
        torch.manual_seed(0)
        return cls(64, 256, 10).eval()

    strategy, records = run_audited(model_fn, batches, audit_mode, tmp_path)
    assert isinstance(strategy.template, fx.GraphModule)
    assert set(strategy.template.state_dict()) == set(model_fn().state_dict())  # Flower's keys load as they are
    assert [(r.round, r.client, r.status) for r in records] == [(1, 0, "ok"), (1, 1, "ok")], records
    for r in records:
        assert r.attack == "exclusivity" and r.num_examples == 8
        assert r.certified >= 1 and r.scores is not None and r.scores.recovered >= 1
        assert r.scores.false_certificates == 0


def test_new_weights_of_two_classes_are_read_at_the_learning_rate_the_client_reports(lfw, tmp_path, server_identity):
    """Clients reply with their new weights, as Flower's quickstart does, on two classes: at an unknown learning rate
    a sample and a blend of like samples read alike and nothing is certified; with the rate the clients report in
    their metrics (``learning-rate``), or the one the server sends in its train config (``lr``, as Flower's
    quickstart does), the weight changes are read at the gradient's own scale, and samples certify, none false."""
    batches = [lfw.batch(16, seed=k) for k in range(2)]  # faces and non-faces

    def model_fn():
        torch.manual_seed(0)
        return DropoutMLP(625, 1000, 2).eval()

    certified = {}
    for how in ("none", "reported", "sent"):  # the rate: not known; in the clients' metrics; in the train config
        config = ConfigRecord({"lr": LR}) if how == "sent" else None
        _, records = run_audited(model_fn, batches, "sync", tmp_path / how, config, weights=True,
                                 report_lr=how == "reported")
        assert [r.status for r in records] == ["ok", "ok"], records
        assert all(r.scores is not None and r.scores.false_certificates == 0 for r in records)
        certified[how] = sum(r.certified for r in records)
    assert certified["none"] == 0 and certified["reported"] >= 2 and certified["sent"] == certified["reported"]


def test_flower_quickstart_net_is_audited_in_the_worker_process(tmp_path, monkeypatch, server_identity):
    """Flower's ``Net`` (conv, max-pool, ``x.view``, ``F.relu``), its class only in the "script": the worker
    rebuilds the traced model and attacks each one-step update."""
    cls = in_main(FlowerNet, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]

    def model_fn():
        torch.manual_seed(0)
        return cls().eval()

    strategy, records = run_audited(model_fn, batches, "process", tmp_path)
    assert [n for n, _ in strategy.template.named_parameters()] == [n for n, _ in FlowerNet().named_parameters()]
    assert [(r.round, r.client, r.status) for r in records] == [(1, 0, "ok"), (1, 1, "ok")], records
    for r in records:
        assert r.attack == "exclusivity" and r.num_examples == 4
        assert r.scores is not None and r.scores.false_certificates == 0


def quickstart_client(make_model, partitions, truth_dir, *, epochs: int = 1, batch_size: int = 16) -> ClientApp:
    """A ClientApp written like Flower's quickstart-pytorch client: ``epochs`` local epochs of SGD with momentum
    over the partition in batches, then the new weights and ``num-examples`` (the partition size) — no
    partition id, no step count. For evaluation only it writes the partition to ``truth_dir``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = partitions[int(context.node_config["partition-id"])]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(context.node_id)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        server_round = int(msg.content["config"]["server-round"])
        write_true_batch(truth_dir, server_round, context.node_id, TrueBatch(x, x, y, -1, (0.0, 1.0)))
        metrics = MetricRecord({"num-examples": len(x), "train_loss": 0.0})
        return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                       reply_to=msg)

    return app


def test_flower_quickstart_clients_multi_step_updates_are_named_and_scored(tmp_path, server_identity):
    """Flower's quickstart setting: ``Net``, one local epoch of momentum SGD in batches of 16 over a partition of
    32. The server knows the epochs and batch size from its run config: every record says "multi-step", names
    the route that ran (auto, not the exact route) and gives PSNR / label accuracy as estimates; no client -1."""
    gen = torch.Generator().manual_seed(1234)  # not the attack's seed: its random start must not be the data
    partitions = [(torch.rand(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
                  for _ in range(2)]

    def model_fn():
        torch.manual_seed(0)
        return FlowerNet().eval()

    model = model_fn()
    plan = AuditPlan("exclusivity", {"known_scale": False}, multi_step_options={"budget": 4.0, "progress": False})
    strategy = AuditFedAvg(model, plan, audit_mode="sync", scorer=GroundTruthScorer(tmp_path),
                           declared={"local_epochs": 1, "batch_size": 16}, fraction_evaluate=0.0,
                           min_available_nodes=2)
    grid = LoopbackGrid(quickstart_client(model_fn, partitions, str(tmp_path)), 2)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1)
        records = strategy.findings()
    finally:
        strategy.close()
    assert len(records) == 2
    for r in records:
        d = r.to_dict()
        assert r.status == "ok", r.detail
        assert r.multi_step and "multi-step" in r.update_kind and "2 local steps of 16" in r.update_kind
        assert r.attack.startswith("auto") and "exclusivity" not in r.attack.split(":")[-1]
        assert r.certified == 0 and r.reason  # said plainly: nothing certified, and why
        assert r.scores is not None and r.scores.psnr is not None and r.scores.label_accuracy is not None
        assert d["scores_estimated"] and d["psnr"] is not None
        assert d["client_id"] == r.node_id and d["client_id"] != -1


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def test_a_batch_norm_model_s_state_dicts_are_audited(digits, server_identity):
    """Clients of a model with BatchNorm send their state dicts (running statistics and the integer counter
    ``num_batches_tracked``) after a step in training mode, as Flower's quickstart does: every reply is audited
    (none 'malformed', as they were, in the first round and, with the averaged counter, in later ones), its local
    steps read off the counter, and the reason for certifying nothing names the BatchNorm run in training
    mode."""
    batches = [(digits.x[k * 8:(k + 1) * 8], digits.y[k * 8:(k + 1) * 8]) for k in range(2)]
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = bn_cnn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        x, y = batches[int(context.node_config["partition-id"])]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                           "metrics": MetricRecord({"num-examples": len(x)})}), reply_to=msg)

    model = bn_cnn()
    strategy = AuditFedAvg(model, AuditPlan("exclusivity", {"input_shape": (1, 8, 8)}), audit_mode="sync",
                           fraction_evaluate=0.0, min_available_nodes=2)
    try:
        result = strategy.start(grid=LoopbackGrid(app, 2), initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=3)
        records = strategy.findings()
    finally:
        strategy.close()
    # every round: the average keeps the counter an integer (a float one sent on made every reply 'malformed')
    assert result.arrays is not None and [r.status for r in records] == ["ok"] * 6, records
    assert result.arrays.to_torch_state_dict()["1.num_batches_tracked"].dtype == torch.int64
    assert all("in 1 local step" in r.update_kind for r in records)
    assert all(r.certified == 0 and "BatchNorm '1' in training mode" in r.reason for r in records)
