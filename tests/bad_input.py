"""What the bad-input tests share: the shape of their small model's inputs, and the check that a call fails with a
:class:`fedleak.FedleakError` whose message names the problem. Their model, batch and update are fixtures
(``tests/conftest.py``)."""

from __future__ import annotations

import pytest

import fedleak

SHAPE = (1, 4, 4)


def raises(error: type[Exception], fragments: tuple[str, ...], fn, *args, **kwargs) -> str:
    """Call ``fn`` expecting ``error`` whose message holds every fragment; return the message."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, fedleak.FedleakError)
    for fragment in fragments:
        assert fragment in message, message
    return message
