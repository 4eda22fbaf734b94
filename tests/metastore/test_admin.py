"""The Admin command channel over a real redis-server: a command and its reply, typed, and a wait that ends."""

from __future__ import annotations

import threading
import time

import pytest

from metastore import RedisServer
from metastore.admin import AdminChannel, AdminCommand, AdminReply


def test_command_and_reply_round_trip() -> None:
    with RedisServer() as redis:
        router, executor = AdminChannel(redis.url, "t"), AdminChannel(redis.url, "t")

        def serve_one() -> None:
            cmd = executor.take(wait_s=5)
            assert cmd is not None and cmd.op == "scale" and cmd.role == "decode" and cmd.replicas == 2
            executor.reply(AdminReply(cmd.id, ["added decode-1 (decode)"], pools={"decode": ["decode-0", "decode-1"]}))

        t = threading.Thread(target=serve_one)
        t.start()
        reply = router.call(AdminCommand("scale", role="decode", replicas=2), timeout_s=5)
        t.join(5)
        assert reply is not None and reply.changes == ["added decode-1 (decode)"] and not reply.error
        assert reply.pools == {"decode": ["decode-0", "decode-1"]}
        t0 = time.monotonic()
        assert router.call(AdminCommand("drain", instance_id="x"), timeout_s=1) is None  # nobody answers
        assert time.monotonic() - t0 < 3
        stale = executor.take(wait_s=1)
        assert stale is not None and not AdminChannel.expired(stale)  # no deadline set: never expires
        assert AdminChannel.expired(AdminCommand("drain", deadline=time.time() - 1))
        router.close()
        executor.close()


def test_a_reply_slower_than_the_clients_default_read_timeout_arrives() -> None:
    """redis-py 8 reads with a 5 s timeout unless told otherwise; the reply wait (an added instance loads its
    model first) must outlast it."""
    with RedisServer() as redis:
        router, executor = AdminChannel(redis.url, "t"), AdminChannel(redis.url, "t")

        def serve_late() -> None:
            cmd = executor.take(wait_s=5)
            assert cmd is not None
            time.sleep(6.5)
            executor.reply(AdminReply(cmd.id, ["added decode-1 (decode)"]))

        t = threading.Thread(target=serve_late)
        t.start()
        reply = router.call(AdminCommand("scale", role="decode", replicas=2), timeout_s=15)
        t.join(10)
        assert reply is not None and reply.changes == ["added decode-1 (decode)"]
        router.close()
        executor.close()


def test_unknown_op_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        AdminCommand("reboot")  # type: ignore[arg-type]
