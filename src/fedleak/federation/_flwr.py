"""Import Flower (an optional extra) with a clear error when it is missing."""

from __future__ import annotations

from fedleak.errors import FedleakError


def require_flwr():
    """Return the ``flwr`` module, or raise :class:`FedleakError` telling how to install it."""
    try:
        import flwr  # noqa: F401
        import flwr.app  # noqa: F401
        import flwr.serverapp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise FedleakError(
            f"the Flower integration needs flwr 1.41 with its simulation extra ({exc}); "
            "install it with: pip install 'fedleak[flower]'"
        ) from None
    return flwr
