"""The Flower ClientApp of an audited federation (Message API, flwr >= 1.20).

Each train message carries the global (or server-modified) weights under ``"arrays"`` and, under
``"config"``, the run's :class:`~fedleak.federation.settings.FederationSettings` as JSON
(``"fedleak-settings"``) plus ``"server-round"``. The reply holds the new weights (``upload="weights"``,
FedAvg) or the change ``before - after`` (``upload="delta"``, FedSGD-style, the default) under ``"arrays"``,
and ``"metrics"`` with ``"num-examples"``.

Defenses Flower realises itself (``local-dp``: ``LocalDpMod``; ``central-dp``: ``fixedclipping_mod``; the
registry :mod:`fedleak.federation.flower_native`) run as those Flower mods: :func:`defense_mods`, the first mod
of every ClientApp :func:`make_client_app` builds, reads the run's settings from the message and calls them
around the app (numpy's global generator, which Flower's noise draws from, seeded from the run's seed, the
round and the partition, so a run is reproducible).

Evaluation only: when the config names a ground-truth folder (``"eval-only-ground-truth-dir"``, set by
``fedleak federate`` to a private temp folder), the client also writes the batch it trained on there
(:mod:`fedleak.federation.ground_truth`). That file never enters a Flower message and the attack never
reads it; only the scorer does.
"""

from __future__ import annotations

from fedleak.federation._flwr import require_flwr

require_flwr()

from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedleak.client_loss import hard_labels  # noqa: E402
from fedleak.defenses.flower_dp import numpy_seeded  # noqa: E402
from fedleak.federation.client import local_update  # noqa: E402
from fedleak.federation.flower_native import client_mods  # noqa: E402
from fedleak.federation.ground_truth import TrueBatch, write_true_batch  # noqa: E402
from fedleak.federation.node_data import node_data_of  # noqa: E402
from fedleak.federation.secagg_client import secagg_mod  # noqa: E402
from fedleak.federation.settings import FederationSettings, data_split, make_model  # noqa: E402

SETTINGS_KEY = "fedleak-settings"
GROUND_TRUTH_KEY = "eval-only-ground-truth-dir"


def partition_id_of(context: Context) -> int:
    cfg = context.node_config
    if "partition-id" in cfg:
        return int(cfg["partition-id"])
    raise RuntimeError("the node config has no 'partition-id' (run it with the simulation engine or set it)")


def defense_mods(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A Flower mod: the Flower mods of the run's Flower-native defenses (none: the app itself), around
    ``call_next``, under a seeded numpy generator."""
    config = msg.content.get("config") if "config" in msg.content else None
    if config is None or SETTINGS_KEY not in config:
        return call_next(msg, context)
    settings = FederationSettings.from_json(str(config[SETTINGS_KEY]))
    mods = client_mods(settings.stack)
    if not mods:
        return call_next(msg, context)
    handler = call_next
    for mod in reversed(mods):  # the list is outermost first
        handler = _chained(mod, handler)
    seed = np.random.SeedSequence([settings.seed, int(config.get("server-round", 0)), partition_id_of(context)])
    with numpy_seeded(int(seed.generate_state(1)[0])):
        return handler(msg, context)


def _chained(mod: Callable, call_next: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    return lambda msg, context: mod(msg, context, call_next)


def make_client_app(mods: list | None = None) -> ClientApp:
    """A ClientApp running :func:`~fedleak.federation.client.local_update` inside :func:`defense_mods`
    (``mods``: further Flower mods, inside those), inside Flower's SecAgg+ mod for the messages of a server that runs
    SecAgg+ (:func:`~fedleak.federation.secagg_client.secagg_mod`)."""
    app = ClientApp(mods=[secagg_mod, defense_mods, *(mods or [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cfg = msg.content["config"]
        settings = FederationSettings.from_json(str(cfg[SETTINGS_KEY]))
        server_round = int(cfg["server-round"])
        pid = partition_id_of(context)
        node = node_data_of(context)  # a SuperNode's own data (deployment runtime); None: its split of the data set
        split = data_split(settings.data, settings.test_size, settings.public_size) if node is None else node
        model = make_model(settings, split)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        result = local_update(model, settings, pid, server_round, data=node)
        # evaluation only, outside the Flower message: the folder the run names, else the node's own folder
        truth_dir = str(cfg[GROUND_TRUTH_KEY]) if GROUND_TRUTH_KEY in cfg else node.truth_dir if node else None
        if truth_dir is not None:
            write_true_batch(truth_dir, server_round, context.node_id,
                             TrueBatch(result.inputs, result.original, hard_labels(result.labels), pid))
        metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                                "local-steps": result.steps, "partition-id": pid,
                                "client-seconds": result.seconds, "sent-bytes": result.sent_bytes})
        sent = result.delta if settings.upload == "delta" else result.weights
        return Message(content=RecordDict({"arrays": ArrayRecord(sent), "metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
