"""Admin commands (`pdserve scale`, `role`, `drain`, `apply`) on their way from any router to the process that
owns the pools (`pdserve serve`), through Redis: a router posts a typed command and waits for its typed reply.

    router (Admin RPC)                                  `pdserve serve` (pdserve/admin_executor.py)
    RPUSH {ns}:admin:cmd  AdminCommand JSON  ─────────► BLPOP: one command at a time, in order
    BLPOP {ns}:admin:reply:{id} (its deadline) ◄──────  RPUSH AdminReply JSON, EXPIRE REPLY_TTL_S

NOTE: Redis, not a named Ray actor: the pools' actor handles live in the serve process (pdserve/cluster.py), and
every router already talks to this Redis. A command past its deadline (no controller took it in time, e.g.
during a restart) is answered as expired, never executed late.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Literal

import redis

ADMIN_OPS = ("scale", "set_role", "drain", "apply")
REPLY_TTL_S = 60


@dataclass(frozen=True)
class AdminCommand:
    op: Literal["scale", "set_role", "drain", "apply"]
    role: str = ""  # scale: the pool; set_role: the new role
    replicas: int = 0  # scale
    instance_id: str = ""  # set_role, drain
    config: dict = field(default_factory=dict)  # apply: the serving YAML's mapping (bases merged)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline: float = 0.0  # wall-clock time (time.time()) after which it must not run

    def __post_init__(self) -> None:
        if self.op not in ADMIN_OPS:
            raise ValueError(f"admin op {self.op!r} is not one of {ADMIN_OPS}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> AdminCommand:
        return AdminCommand(**json.loads(text))


@dataclass(frozen=True)
class AdminReply:
    """What a command did. `error` set: it did nothing further (`code`: the gRPC status name to answer with)."""

    id: str
    changes: list[str] = field(default_factory=list)  # one line per step done, in order
    needs_restart: list[str] = field(default_factory=list)  # apply: differences it cannot make live
    pools: dict[str, list[str]] = field(default_factory=dict)  # role -> its instances, after the command
    error: str = ""
    code: str = ""  # INVALID_ARGUMENT | FAILED_PRECONDITION | DEADLINE_EXCEEDED | INTERNAL

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> AdminReply:
        return AdminReply(**json.loads(text))


class AdminChannel:
    """Both ends of the command queue. Its own Redis connection: BLPOP blocks longer than the store's socket
    timeout allows."""

    def __init__(self, url: str, namespace: str = "pdserve") -> None:
        # NOTE: socket_timeout=None said out loud: redis-py 8 reads with a 5 s timeout by default, which cut
        # every reply wait (an added instance takes longer) short with "Timeout reading from socket".
        self.r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None, health_check_interval=30)
        self.ns = namespace

    def _cmd_key(self) -> str:
        return f"{self.ns}:admin:cmd"

    def _reply_key(self, command_id: str) -> str:
        return f"{self.ns}:admin:reply:{command_id}"

    # ---- the router's end ----------------------------------------------------------------------------------
    def call(self, command: AdminCommand, timeout_s: float) -> AdminReply | None:
        """Post `command` and wait up to `timeout_s` for its reply; None when none came."""
        self.r.rpush(self._cmd_key(), command.to_json())
        got = self.r.blpop([self._reply_key(command.id)], timeout=max(1, int(timeout_s + 0.999)))
        return None if got is None else AdminReply.from_json(got[1])

    # ---- the executor's end --------------------------------------------------------------------------------
    def take(self, wait_s: int = 1) -> AdminCommand | None:
        got = self.r.blpop([self._cmd_key()], timeout=wait_s)
        return None if got is None else AdminCommand.from_json(got[1])

    def reply(self, reply: AdminReply) -> None:
        pipe = self.r.pipeline()
        pipe.rpush(self._reply_key(reply.id), reply.to_json())
        pipe.expire(self._reply_key(reply.id), REPLY_TTL_S)
        pipe.execute()

    @staticmethod
    def expired(command: AdminCommand) -> bool:
        return bool(command.deadline) and time.time() > command.deadline

    def close(self) -> None:
        self.r.close()
