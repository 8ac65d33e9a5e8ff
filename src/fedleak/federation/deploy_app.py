"""The Flower app ``fedleak federate --runtime deployment`` submits to a SuperLink: fedleak's audited ServerApp and
its ClientApp, as components of a Flower App (FAB) whose ``pyproject.toml`` names ``server_app`` and
``client_app`` here.

* :data:`server_app` reads the run's :class:`~fedleak.federation.settings.FederationSettings` from the run config
  (``fedleak-settings``, JSON), runs the same rounds as the simulation (:func:`~fedleak.federation.server_app.
  make_server_app` around :func:`~fedleak.federation.server_app.build_strategy`), lets the clients score what the
  audit rebuilt of them (:mod:`fedleak.federation.score_channel`) and writes the
  :class:`~fedleak.federation.results.FederationResult` to the file the run config names (``fedleak-result``,
  :mod:`fedleak.federation.result_codec`), on the SuperLink's machine.
* :data:`client_app` is :func:`~fedleak.federation.client_app.make_client_app` plus the scoring handler; each
  SuperNode trains on the data in its own ``data-dir`` (:mod:`fedleak.federation.node_data`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from fedleak.federation._flwr import require_flwr

require_flwr()

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedleak.federation.client_app import SETTINGS_KEY, make_client_app  # noqa: E402
from fedleak.federation.score_channel import SCORE_ACTION, ReconstructionStash, score_by_clients, score_reply  # noqa: E402
from fedleak.federation.settings import FederationSettings  # noqa: E402

RESULT_KEY = "fedleak-result"  # run-config key: where the ServerApp writes its result
SCORE_TIMEOUT_KEY = "fedleak-score-timeout"  # run-config key: seconds the clients have to score

server_app = ServerApp()
client_app = make_client_app()
client_app.evaluate(SCORE_ACTION)(score_reply)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedleak.federation.result_codec import dump_result
    from fedleak.report.output import write_atomic

    settings = FederationSettings.from_json(str(context.run_config[SETTINGS_KEY]))
    result = audited_run(grid, context, settings, score_timeout=float(context.run_config.get(SCORE_TIMEOUT_KEY, 600)))
    write_atomic(Path(str(context.run_config[RESULT_KEY])), dump_result(result))


def audited_run(grid: Grid, context: Context, settings: FederationSettings, *, score_timeout: float = 600):
    """The audited rounds of ``settings`` on ``grid``, then the clients' scoring; the FederationResult."""
    from fedleak.federation.client import federation_accounting
    from fedleak.federation.run import defense_summary, federation_result
    from fedleak.federation.server_app import build_strategy, make_server_app

    start = time.perf_counter()
    defenses = defense_summary(settings, federation_accounting(settings))
    evaluations: dict[int, tuple[float, float]] = {}
    stash_dir = tempfile.mkdtemp(prefix="fedleak-rebuilt-")  # the server's own folder: its reconstructions
    try:
        stash = ReconstructionStash(stash_dir)
        strategy, audit = build_strategy(settings, scorer=stash if settings.audit else None)
        app = make_server_app(settings, strategy, on_evaluate=lambda r, a, l: evaluations.__setitem__(r, (a, l)))
        try:
            app(grid, context)
            records = audit.findings()  # waits for the attacks still running
            records, _ = score_by_clients(grid, records, stash, timeout=score_timeout)
            audit.close()
        except BaseException:
            audit.close(force=True)
            raise
    finally:
        shutil.rmtree(stash_dir, ignore_errors=True)
    return federation_result(settings, evaluations, records, audit, time.perf_counter() - start, defenses)
