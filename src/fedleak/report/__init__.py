"""Outputs shared by every command: atomic writes and provenance (:mod:`fedleak.report.output`), and the HTML
reports of ``fedleak audit``, ``fedleak reconstruct`` and ``fedleak federate`` (one Jinja2 design:
:mod:`fedleak.report.render`, view models in :mod:`fedleak.report.audit`, :mod:`fedleak.report.reconstruction`
and :mod:`fedleak.report.federation`; Jinja2 and matplotlib load only when a page is rendered)."""

from fedleak.report.output import environment_info, prepare_output_dir, write_atomic, write_json

__all__ = ["environment_info", "prepare_output_dir", "write_atomic", "write_json"]
