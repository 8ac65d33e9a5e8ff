"""The client side of SecAgg+ in an audited federation: Flower's ``secaggplus_mod`` around fedleak's ClientApp.

:func:`secagg_mod` is the outermost mod of every ClientApp :func:`~fedleak.federation.client_app.make_client_app`
builds. A train message of Flower's SecAgg+ workflow (it carries the ``"secaggplus"`` config record) goes through
Flower's own :func:`flwr.clientapp.mod.secaggplus_mod`, unchanged: key setup and sharing, then, in the "collect
masked vectors" stage, the app trains and the mod clips, quantizes and masks its upload, and clears the arrays
of the reply; any other message goes straight to the app. Flower's SecAgg+ workflow speaks the legacy fit format
(``fitins.*`` in, ``fitres.*`` out); :func:`legacy_fit` translates it for the app, whose own mods (Flower's DP
mods of the run's defenses) then act on the upload before it is masked.

The server puts into each client's fit config the parameter names (``"secagg-names"``, the legacy format has none),
the dtype to upload in (``"secagg-dtype"``: Flower quantizes in it) and a seed (``"secagg-seed"``) for numpy's
global generator, which Flower's stochastic rounding draws from, so a run is reproducible. Evaluation only: when
the config names a folder (``"secagg-eval-only-dir"``, ``fedleak federate``'s private temp folder), the client
also writes its exact upload there, before it is quantized, so the scorer can measure SecAgg+'s error
(:mod:`fedleak.federation.aggregate_audit`); it never enters a Flower message.
"""

from __future__ import annotations

from collections.abc import Callable

from fedleak.federation._flwr import require_flwr

require_flwr()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402

from fedleak.defenses.flower_dp import numpy_seeded  # noqa: E402
from fedleak.federation.aggregate_audit import write_exact_upload  # noqa: E402

NAMES_KEY = "secagg-names"
SEED_KEY = "secagg-seed"
DTYPE_KEY = "secagg-dtype"
UPLOADS_KEY = "secagg-eval-only-dir"
FIT_PARAMETERS, FIT_CONFIG = "fitins.parameters", "fitins.config"

Handler = Callable[[Message, Context], Message]


def secagg_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """A Flower mod: Flower's ``secaggplus_mod`` for the SecAgg+ workflow's messages, nothing for the others."""
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    fit_config = msg.content.config_records.get(FIT_CONFIG)
    if fit_config is None or SEED_KEY not in fit_config:  # key stages: no rounding to seed
        return secaggplus_mod(msg, context, legacy_fit(call_next))
    with numpy_seeded(int(fit_config[SEED_KEY])):
        return secaggplus_mod(msg, context, legacy_fit(call_next))


def legacy_fit(call_next: Handler) -> Handler:
    """``call_next`` (an app speaking fedleak's format: ``"arrays"`` + ``"config"`` in, ``"arrays"`` + ``"metrics"``
    with ``"num-examples"`` out) behind the legacy fit format that Flower's SecAgg+ workflow and mod use."""

    def handle(msg: Message, context: Context) -> Message:
        content = msg.content
        config = dict(content.config_records[FIT_CONFIG])
        names = [str(n) for n in config.pop(NAMES_KEY)]
        dtype = np.dtype(str(config.pop(DTYPE_KEY, "float32")))
        arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(content.array_records[FIT_PARAMETERS],
                                                                         keep_input=True))
        if len(arrays) != len(names):
            raise ValueError(f"the server sent {len(arrays)} arrays for {len(names)} parameter names")
        state = {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)}
        msg.content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        upload = reply.content["arrays"].to_torch_state_dict()
        metrics = dict(reply.content["metrics"])
        if UPLOADS_KEY in config:  # evaluation only, outside the Flower message
            write_exact_upload(str(config[UPLOADS_KEY]), int(config["server-round"]), context.node_id, upload)
        fitres = RecordDict()
        fitres.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([upload[n].detach().cpu().numpy().astype(dtype) for n in names]), keep_input=True)
        fitres.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": int(metrics["num-examples"])})
        fitres.config_records["fitres.metrics"] = ConfigRecord(metrics)
        fitres.config_records["fitres.status"] = ConfigRecord({"code": 0, "message": "Success"})
        return Message(fitres, reply_to=msg)

    return handle
