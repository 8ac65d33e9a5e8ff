"""EVALUATION-ONLY scoring through Flower's own messages: each client scores what the server rebuilt of it.

On the deployment runtime the clients' data stays on their machines, so no scorer can read their true batches.
Instead (``fedleak federate --runtime deployment``):

1. the audit keeps each reconstruction in the server's own folder (:class:`ReconstructionStash`, the strategy's
   ``scorer``, which scores nothing itself);
2. after the last round the server sends every client one ``evaluate`` message (type :data:`SCORE_MESSAGE`) with
   what was rebuilt of each of its audited updates (inputs, labels, which are certified, each certificate's
   claimed error bound) (:func:`score_by_clients`);
3. the client (:func:`score_reply`, a handler of the ClientApp) matches it against the batch it kept in its own
   folder (:mod:`fedleak.federation.node_data`) with the same :class:`~fedleak.federation.ground_truth.
   GroundTruthScorer` the simulation uses, and replies with numbers only (:class:`~fedleak.federation.results.
   Scores` less the image previews): no sample of the client ever travels to the server.

The attack has run before any of this; it never sees these replies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedleak.federation._flwr import require_flwr

require_flwr()

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

from fedleak.federation.ground_truth import GroundTruthScorer  # noqa: E402
from fedleak.federation.node_data import node_data_of  # noqa: E402
from fedleak.federation.results import ClientRecord, Scores  # noqa: E402
from fedleak.reconstruction import Reconstruction, SampleRecovery  # noqa: E402
from fedleak.report.output import write_bytes_atomic  # noqa: E402

SCORE_ACTION = "fedleak_score"
SCORE_MESSAGE = f"evaluate.{SCORE_ACTION}"
ROUNDS_KEY = "rounds"
_REC_KEYS = ("inputs", "labels", "certified", "rebuilt", "error-bound")
# Scores fields sent as numbers (absent: None)
_NUMBERS = ("batch_size", "recovered", "recovered_fraction", "psnr", "psnr_original", "label_accuracy",
            "false_certificates", "ssim")


@dataclass(frozen=True)
class ScoreRequest:
    """Which of its batches a client scores: what :class:`GroundTruthScorer` looks the true batch up by."""

    server_round: int
    node_id: int


class ReconstructionStash:
    """A strategy ``scorer`` (picklable, runs in the audit worker) that keeps each reconstruction in the server's
    ``folder`` for the clients to score later, and scores nothing (returns None)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = str(folder)

    def _path(self, server_round: int, node_id: int) -> Path:
        return Path(self.folder) / f"r{int(server_round)}-n{int(node_id)}.safetensors"

    def __call__(self, job, rec: Reconstruction) -> None:
        from safetensors.torch import save

        path = self._path(job.server_round, job.node_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, save(reconstruction_arrays(rec)))
        return None

    def load(self, server_round: int, node_id: int) -> ArrayRecord | None:
        """The reconstruction of that update as an ArrayRecord, or None when the audit kept none."""
        from safetensors.torch import load_file

        path = self._path(server_round, node_id)
        return ArrayRecord(load_file(str(path))) if path.is_file() else None


def reconstruction_arrays(rec: Reconstruction) -> dict[str, torch.Tensor]:
    """What a client needs to score ``rec``: its inputs, labels, certificates and each certificate's claim."""
    n = len(rec)
    own = len(rec.samples) == n
    rebuilt = [s.rebuilt for s in rec.samples] if own else [True] * n
    return {"inputs": rec.inputs.detach().float().contiguous().clone(),
            "labels": rec.labels.detach().long().reshape(n).clone(),
            "certified": rec.certified.detach().to(torch.uint8).reshape(n).clone(),
            "rebuilt": torch.tensor(rebuilt, dtype=torch.uint8).reshape(n),
            "error-bound": torch.from_numpy(rec.error_bounds.astype("float64")).reshape(n)}


def reconstruction_from(record: ArrayRecord, attack: str = "") -> Reconstruction:
    """The :class:`Reconstruction` a score message carries (inverse of :func:`reconstruction_arrays`)."""
    arrays = record.to_torch_state_dict()
    missing = [k for k in _REC_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"the score message lacks {missing}")
    certified = arrays["certified"].bool()
    samples = tuple(SampleRecovery(int(label), bool(c), "", error_bound=float(eb), rebuilt=bool(r))
                    for label, c, eb, r in zip(arrays["labels"].tolist(), certified.tolist(),
                                               arrays["error-bound"].tolist(), arrays["rebuilt"].tolist()))
    return Reconstruction(arrays["inputs"], arrays["labels"], certified, attack, samples)


def scores_to_records(scores: Scores) -> tuple[MetricRecord, ConfigRecord]:
    """A client's reply for one round: the scores as numbers, the false certificates' reasons as text; no images."""
    numbers = {k: getattr(scores, k) for k in _NUMBERS if getattr(scores, k) is not None}
    if scores.value_range is not None:
        numbers["value-lo"], numbers["value-hi"] = (float(v) for v in scores.value_range)
    return MetricRecord(numbers), ConfigRecord({"false-certificate-reasons": list(scores.false_certificate_reasons)})


def scores_from(m: MetricRecord, reasons: ConfigRecord) -> Scores:
    """The :class:`Scores` of a client's reply for one round (inverse of :func:`scores_to_records`; no preview)."""
    get = (lambda k: m[k] if k in m else None)  # noqa: E731
    value_range = (float(m["value-lo"]), float(m["value-hi"])) if "value-lo" in m else None
    return Scores(int(m["batch_size"]), int(m["recovered"]), float(m["recovered_fraction"]), get("psnr"),
                  get("psnr_original"), get("label_accuracy"), int(m["false_certificates"]),
                  false_certificate_reasons=tuple(str(r) for r in reasons.get("false-certificate-reasons", [])),
                  value_range=value_range, ssim=get("ssim"))


def score_reply(msg: Message, context: Context) -> Message:
    """Client side: score each reconstruction in ``msg`` (one per round, ``rebuilt-<round>``) against the batch this
    node kept for that round (its own folder) and reply with the numbers (``scores-<round>``, ``reasons-<round>``);
    a round it kept no batch for gets no entry. A node without its own data folder replies with an error."""
    node = node_data_of(context)
    if node is None:
        raise RuntimeError("this node has no data-dir in its node config: it kept no batch to score against")
    scorer = GroundTruthScorer(node.truth_dir, preview=0, data_range=node.value_range,
                               normalization=node.normalization)
    content = RecordDict()
    for server_round in msg.content["config"][ROUNDS_KEY]:
        rec = reconstruction_from(msg.content[f"rebuilt-{int(server_round)}"])
        scores = scorer(ScoreRequest(int(server_round), int(context.node_id)), rec)
        if scores is not None:
            content[f"scores-{int(server_round)}"], content[f"reasons-{int(server_round)}"] = scores_to_records(scores)
    return Message(content=content, reply_to=msg)


def score_by_clients(grid, records: list[ClientRecord], stash: ReconstructionStash, *,
                     timeout: float | None = None) -> tuple[list[ClientRecord], int]:
    """Server side: send each client, in one message, what the audit rebuilt of each of its updates, and put the
    scores it replies into the records. Returns (records, number of audited updates no client scored: no reply, an
    error reply, or no batch kept)."""
    per_node: dict[int, RecordDict] = {}
    wanted = 0
    for r in records:
        arrays = stash.load(r.round, r.node_id) if r.status == "ok" else None
        if arrays is None:
            continue
        content = per_node.setdefault(r.node_id, RecordDict())
        content[f"rebuilt-{r.round}"] = arrays
        wanted += 1
    messages = []
    for node_id, content in per_node.items():
        rounds = sorted(int(k.split("-", 1)[1]) for k in content.array_records)
        content["config"] = ConfigRecord({ROUNDS_KEY: rounds})
        messages.append(Message(content=content, message_type=SCORE_MESSAGE, dst_node_id=node_id,
                                group_id="fedleak-score"))
    scored: dict[tuple[int, int], Scores] = {}
    for reply in (grid.send_and_receive(messages, timeout=timeout) if messages else []):
        if reply.has_error():
            continue
        node_id = int(reply.metadata.src_node_id)
        for key in reply.content.metric_records:
            server_round = int(key.split("-", 1)[1])
            scored[(server_round, node_id)] = scores_from(reply.content[key], reply.content[f"reasons-{server_round}"])
    out = [replace(r, scores=scored[(r.round, r.node_id)]) if (r.round, r.node_id) in scored else r
           for r in records]
    return out, wanted - len(scored)
