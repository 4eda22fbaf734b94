"""The reader/holder control messages: both round-trip through their bytes, and malformed bytes from the network
(not JSON, not UTF-8, an unknown op, missing or extra fields, wrong types) are a ValueError, never a message."""

from __future__ import annotations

import json

import pytest

from kv_transfer.messages import ReleaseAck, ReleaseRequest, StreamBlocks, StreamProgress, decode_message


def test_release_request_round_trips_with_its_exact_wire_form() -> None:
    msg = ReleaseRequest(request_id="p-7", reader="decode-0/rank0", reader_metadata_b64="bWQ=")
    raw = msg.encode()
    assert json.loads(raw) == {"op": "release", "request_id": "p-7", "reader": "decode-0/rank0",
                               "reader_metadata_b64": "bWQ="}
    back = decode_message(raw)
    assert type(back) is ReleaseRequest and back == msg


@pytest.mark.parametrize("held", [True, False])
def test_release_ack_round_trips(held: bool) -> None:
    msg = ReleaseAck(engine_id="prefill-1", request_id="p-7", held=held)
    assert json.loads(msg.encode()) == {"op": "ack", "engine_id": "prefill-1", "request_id": "p-7", "held": held}
    back = decode_message(msg.encode())
    assert type(back) is ReleaseAck and back == msg and back.held is held


def _ack(**fields: object) -> bytes:
    return json.dumps({"op": "ack", "engine_id": "e", "request_id": "r", "held": True, **fields}).encode()


def _without(raw: bytes, key: str) -> bytes:
    data = json.loads(raw)
    del data[key]
    return json.dumps(data).encode()


@pytest.mark.parametrize(("raw", "message"), [
    (b"release p-7", "not JSON"),
    (b"", "not JSON"),
    (b"\x80\x81{}", "not JSON"),  # not UTF-8
    (b'{"op": "release", "request_id": "\xc3\x28"}', "not JSON"),  # invalid UTF-8 inside a string
    (b"[1, 2]", "no known 'op'"),
    (b'"ack"', "no known 'op'"),
    (b'{"request_id": "r"}', "no known 'op'"),
    (b'{"op": "RELEASE", "request_id": "r", "reader": "a", "reader_metadata_b64": ""}', "no known 'op'"),
    (b'{"op": null}', "no known 'op'"),
    (_without(_ack(), "held"), r"ReleaseAck fields \['engine_id', 'request_id'\], expected \['engine_id', 'held', "
                               r"'request_id'\]"),
    (_ack(extra=1), r"ReleaseAck fields \['engine_id', 'extra', 'held', 'request_id'\]"),
    (_ack(held="true"), "ReleaseAck.held must be a bool"),
    (_ack(held=1), "ReleaseAck.held must be a bool"),
    (_ack(held=None), "ReleaseAck.held must be a bool"),
    (_ack(request_id=7), "ReleaseAck.request_id must be a str"),
    (_ack(engine_id=True), "ReleaseAck.engine_id must be a str"),  # a bool is not a str either
    (json.dumps({"op": "release", "request_id": "r", "reader": ["a"], "reader_metadata_b64": ""}).encode(),
     "ReleaseRequest.reader must be a str"),
    (json.dumps({"op": "release", "request_id": "r", "reader": "a"}).encode(), "ReleaseRequest fields"),
    (json.dumps({"op": "release", "request_id": "r", "reader": "a", "reader_metadata_b64": "", "held": True})
     .encode(), "ReleaseRequest fields"),
])
def test_malformed_bytes_are_a_value_error(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_message(raw)


def test_a_bool_in_a_str_field_or_an_int_in_the_bool_field_is_refused_by_type() -> None:
    """bool is a subclass of int in Python, not of str: check the decoder does not accept 0/1 for held."""
    with pytest.raises(ValueError, match="held must be a bool"):
        decode_message(_ack(held=0))
    with pytest.raises(ValueError, match="reader_metadata_b64 must be a str"):
        decode_message(json.dumps({"op": "release", "request_id": "r", "reader": "a",
                                   "reader_metadata_b64": False}).encode())


def test_stream_messages_round_trip() -> None:
    blocks = StreamBlocks(engine_id="prefill-0", request_id="r", block_ids=[4, 5, 9], num_tokens=40)
    progress = StreamProgress(engine_id="prefill-0", request_id="r", groups_done=4, first_token=17, aborted=False)
    for msg in (blocks, progress):
        back = decode_message(msg.encode())
        assert type(back) is type(msg) and back == msg


def _progress(**fields: object) -> bytes:
    return json.dumps({"op": "progress", "engine_id": "e", "request_id": "r", "groups_done": 1, "first_token": -1,
                       "aborted": False, **fields}).encode()


def _blocks(**fields: object) -> bytes:
    return json.dumps({"op": "blocks", "engine_id": "e", "request_id": "r", "block_ids": [1, 2], "num_tokens": 20,
                       **fields}).encode()


@pytest.mark.parametrize(("raw", "message"), [
    (_progress(groups_done=True), "StreamProgress.groups_done must be an int"),  # a bool is not a count
    (_progress(groups_done=1.0), "StreamProgress.groups_done must be an int"),
    (_progress(first_token="7"), "StreamProgress.first_token must be an int"),
    (_progress(aborted=0), "StreamProgress.aborted must be a bool"),
    (_blocks(block_ids="1,2"), "StreamBlocks.block_ids must be a list"),
    (_blocks(block_ids=[1, -2]), "StreamBlocks.block_ids must be a list of non-negative integers"),
    (_blocks(block_ids=[1, True]), "StreamBlocks.block_ids must be a list of non-negative integers"),
    (_blocks(block_ids=[1, 2.5]), "StreamBlocks.block_ids must be a list of non-negative integers"),
    (_blocks(num_tokens=None), "StreamBlocks.num_tokens must be an int"),
])
def test_malformed_stream_messages_are_value_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_message(raw)
