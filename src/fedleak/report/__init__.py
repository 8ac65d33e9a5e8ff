"""Output helpers shared by every command: atomic writes, provenance, inline figures."""

from fedleak.report.output import environment_info, prepare_output_dir, write_atomic, write_json

__all__ = ["environment_info", "prepare_output_dir", "write_atomic", "write_json"]
