"""A client's train reply, read by :class:`~fedleak.federation.strategy.AuditFedAvg`: checked and turned into a
:class:`fedleak.WeightUpdate`, with what the server knows of the client's local training (what the round's train
config sent it, and what it reports in its metrics).

* :func:`parse_reply`: the reply as a WeightUpdate, or :class:`~fedleak.errors.UpdateError` saying what is wrong.
* :func:`partition_of`: the partition a reply names (-1 where it names none).
* :func:`sent_rate`: the learning rate a round's train config sends, as a declared fact.
* :func:`state_dict_of`: an ArrayRecord's arrays as torch tensors (copies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedleak.federation._flwr import require_flwr

require_flwr()

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message  # noqa: E402

from fedleak.declared import check_declared  # noqa: E402
from fedleak.errors import FedleakError, UpdateError  # noqa: E402
from fedleak.updates import WeightUpdate  # noqa: E402
from fedleak.validation import all_finite  # noqa: E402

# metric names a client may report its local training under (Flower's kebab-case), and the fact each declares
REPORTED_FACTS = {"local-steps": "local_steps", "local-epochs": "local_epochs", "batch-size": "batch_size",
                  "learning-rate": "learning_rate"}
# the keys a server's train config sends its clients' learning rate under (Flower's quickstart: "lr")
SENT_RATE_KEYS = ("lr", "learning-rate", "learning_rate")
__all__ = ["REPORTED_FACTS", "SENT_RATE_KEYS", "parse_reply", "partition_of", "sent_rate", "state_dict_of"]


def state_dict_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in record.to_torch_state_dict().items()}


def partition_of(msg: Message) -> int:
    try:
        return int(msg.content["metrics"]["partition-id"])
    except Exception:  # noqa: BLE001 - a malformed reply may lack anything
        return -1


def parse_reply(msg: Message, sent: Mapping[str, torch.Tensor] | None, weighted_by_key: str, upload: str,
                declared: Mapping[str, Any]
                ) -> tuple[WeightUpdate, int, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The reply as a WeightUpdate (and the uploaded change, if any, and what the server knows of the
    client's training: ``declared`` updated by the client's own metrics), or UpdateError saying what is
    wrong with it. With ``upload="delta"`` the reply's arrays are replaced by the new weights, so that
    FedAvg averages weights as usual. ``weighted_by_key``: the metric holding the client's number of examples."""
    content = msg.content
    if sent is None:
        raise UpdateError("reply to a round this strategy did not configure")
    arrays = [content[k] for k in content.array_records]
    metrics = [content[k] for k in content.metric_records]
    if len(arrays) != 1 or len(metrics) != 1:
        raise UpdateError(f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}")
    try:
        after = arrays[0].to_torch_state_dict()
    except Exception as exc:  # noqa: BLE001 - undecodable arrays
        raise UpdateError(f"the arrays cannot be read: {exc}") from None
    n = metrics[0].get(weighted_by_key)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0 or not math.isfinite(n):
        raise UpdateError(f"'{weighted_by_key}' must be a positive number, got {n!r}")
    missing, extra = sorted(set(sent) - set(after)), sorted(set(after) - set(sent))
    if missing or extra:
        raise UpdateError(f"arrays differ from the model's: missing {missing}, unexpected {extra}")
    for k, v in after.items():
        if tuple(v.shape) != tuple(sent[k].shape):
            raise UpdateError(f"'{k}' has shape {tuple(v.shape)}, the model's is {tuple(sent[k].shape)}")
        if not v.is_floating_point() and (sent[k].is_floating_point() or v.is_complex() or v.dtype == torch.bool):
            raise UpdateError(f"'{k}' has dtype {v.dtype}")  # integers only where the model counts (BatchNorm)
    delta = None
    if upload == "delta":
        delta = {k: v.to(sent[k].dtype) for k, v in after.items()}
        if not all(all_finite(v) for v in delta.values() if v.is_floating_point()):
            raise UpdateError("the uploaded change holds non-finite value(s) (NaN or inf)")
        after = {k: sent[k] - delta[k] for k in sent}
        content[next(iter(content.array_records))] = ArrayRecord(after)
    try:  # what the client reports of its own training; a bad value is ignored, not a bad update
        reported = check_declared({key: metrics[0][name] for name, key in REPORTED_FACTS.items()
                                   if name in metrics[0]})
    except FedleakError:
        reported = {}
    declared = {**declared, **reported}
    update = WeightUpdate(sent, {k: v.to(sent[k].dtype) for k, v in after.items()}, num_examples=int(n))
    return update, partition_of(msg), delta, declared


def sent_rate(config: ConfigRecord | None) -> dict[str, Any]:
    """The learning rate a round's train config sends the clients (under :data:`SENT_RATE_KEYS`), as a declared
    fact; nothing where it sends none, or no positive number."""
    key = next((k for k in SENT_RATE_KEYS if config is not None and k in config), None)
    try:
        return {} if key is None else check_declared({"learning_rate": config[key]})
    except FedleakError:
        return {}
