"""The errors a transfer can end with. Each names what went wrong and where to look."""

from __future__ import annotations


class TransferError(RuntimeError):
    """Base class: the KV cache of a request did not arrive intact."""

    def __init__(self, message: str, *, request_id: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.field = field


class AuthError(TransferError):
    """The peer's token does not match this deployment's token; the receiver refused it."""


class HeaderError(TransferError):
    """The header is malformed, too large, or does not match what the receiver expects (`field` names it)."""


class PayloadError(TransferError):
    """The KV bytes are truncated, duplicated, missing a layer, or fail their checksum."""


class TransferTimeout(TransferError, TimeoutError):
    """Nothing (or not everything) arrived within the timeout."""


# Only these names travel back to a sender in an error reply; anything else becomes TransferError.
ERROR_TYPES: dict[str, type[TransferError]] = {
    c.__name__: c for c in (TransferError, AuthError, HeaderError, PayloadError, TransferTimeout)
}
