"""Read states: a NIXL/UCX exception becomes a typed error (a lost peer when its text says disconnect, remote or
unreachable, else an internal failure), typed errors pass through, and the states are picklable values."""

from __future__ import annotations

import pickle

import pytest

from kv_transfer.errors import KVReleasedError, KVTransferError, PeerGoneError, TransferTimeoutError
from kv_transfer.read_state import DONE, IN_FLIGHT, ReadState, ReadStatus, error_from


class NixlBackendError(Exception):  # the shape of what the NIXL bindings raise: a class name and a message
    pass


@pytest.mark.parametrize("exc", [
    NixlBackendError("UCX_ERR: Endpoint DISCONNECTED by peer"),
    RuntimeError("remote access error"),
    OSError("Destination is unreachable"),
    ConnectionError("UCX: unreachable"),
])
def test_disconnect_and_unreachable_are_a_lost_peer(exc: Exception) -> None:
    err = error_from(exc)
    assert type(err) is PeerGoneError and err.kind == "peer"
    assert str(err) == f"{type(exc).__name__}: {exc}"


def test_the_exception_class_name_counts_too() -> None:
    class RemoteAccessError(Exception):
        pass

    assert type(error_from(RemoteAccessError("status -3"))) is PeerGoneError


@pytest.mark.parametrize("exc", [
    NixlBackendError("NIXL_ERR_BACKEND: invalid memory handle"),
    ValueError("bad descriptor list"),
    RuntimeError(""),
])
def test_anything_else_is_an_internal_failure(exc: Exception) -> None:
    err = error_from(exc)
    assert type(err) is KVTransferError and err.kind == "error"
    assert str(err) == f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("err", [
    TransferTimeoutError("read did not finish in 1.0 s"),
    KVReleasedError("the holder freed the blocks"),
    PeerGoneError("gone"),
    KVTransferError("disconnect"),  # already typed: its text is not re-read
])
def test_typed_errors_pass_through_unchanged(err: KVTransferError) -> None:
    assert error_from(err) is err


def test_states_are_plain_picklable_values() -> None:
    assert IN_FLIGHT == ReadState(ReadStatus.IN_FLIGHT) and DONE.status is ReadStatus.DONE and DONE.error is None
    failed = ReadState.failed(PeerGoneError("gone"))
    assert failed.status is ReadStatus.FAILED and isinstance(failed.error, PeerGoneError)
    back = pickle.loads(pickle.dumps(failed))  # crosses from a TP rank's process to the driver
    assert back.status is ReadStatus.FAILED and type(back.error) is PeerGoneError and str(back.error) == "gone"
