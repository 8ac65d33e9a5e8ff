"""The Flower ClientApp of an audited federation (Message API, flwr >= 1.20).

Each train message carries the global (or server-modified) weights under ``"arrays"`` and, under
``"config"``, the run's :class:`~fedleak.federation.settings.FederationSettings` as JSON
(``"fedleak-settings"``) plus ``"server-round"``. The reply holds the new weights (``upload="weights"``, FedAvg) or the change
``before - after`` (``upload="delta"``, FedSGD-style, the default) under ``"arrays"``, and ``"metrics"``
with ``"num-examples"``.

Evaluation only: when the config names a ground-truth folder (``"eval-only-ground-truth-dir"``, set by
``fedleak federate`` to a private temp folder), the client also writes the batch it trained on there
(:mod:`fedleak.federation.ground_truth`). That file never enters a Flower message and the attack never
reads it; only the scorer does.
"""

from __future__ import annotations

from fedleak.federation._flwr import require_flwr

require_flwr()

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedleak.federation.client import local_update  # noqa: E402
from fedleak.federation.ground_truth import TrueBatch, write_true_batch  # noqa: E402
from fedleak.federation.settings import FederationSettings, data_split, make_model  # noqa: E402

SETTINGS_KEY = "fedleak-settings"
GROUND_TRUTH_KEY = "eval-only-ground-truth-dir"


def partition_id_of(context: Context) -> int:
    cfg = context.node_config
    if "partition-id" in cfg:
        return int(cfg["partition-id"])
    raise RuntimeError("the node config has no 'partition-id' (run it with the simulation engine or set it)")


def make_client_app(mods: list | None = None) -> ClientApp:
    """A ClientApp running :func:`~fedleak.federation.client.local_update` (``mods``: Flower mods, e.g. DP)."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cfg = msg.content["config"]
        settings = FederationSettings.from_json(str(cfg[SETTINGS_KEY]))
        server_round = int(cfg["server-round"])
        pid = partition_id_of(context)
        split = data_split(settings.data, settings.test_size, settings.public_size)
        model = make_model(settings, split)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        result = local_update(model, settings, pid, server_round)
        if GROUND_TRUTH_KEY in cfg:  # evaluation-only side channel, outside the Flower message
            write_true_batch(str(cfg[GROUND_TRUTH_KEY]), server_round, context.node_id,
                             TrueBatch(result.inputs, result.original, result.labels, pid))
        metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                                "local-steps": result.steps, "partition-id": pid})
        sent = result.delta if settings.upload == "delta" else result.weights
        return Message(content=RecordDict({"arrays": ArrayRecord(sent), "metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
