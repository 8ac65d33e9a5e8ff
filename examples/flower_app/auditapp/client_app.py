"""Your ClientApp: trains your model on your data. Nothing in it knows about the audit."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from auditapp.task import Net, load_data, run_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = run_config(context)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config)
    batch, steps = int(cfg["batch-size"]), int(cfg["local-steps"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + int(msg.content["config"]["server-round"]))
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:batch]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    metrics = MetricRecord({"num-examples": batch, "local-steps": steps, "batch-size": batch,
                            "train-loss": float(loss)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
