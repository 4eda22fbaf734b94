"""Which UCX transport a KV read path really uses, and a loud warning when a fast path fell back to TCP.

UCX picks among shm (cma, posix, sysv), tcp, rdma (rc, ud, dc) and cuda_ipc per endpoint, silently. A GPU↔GPU
or cross-node path that ends up on TCP is the most reported performance problem of disaggregated serving, so
each agent asks UCX to describe its READ ("get") protocols (UCX_PROTO_INFO restricted to *get*, written as
files to UCX_PROTO_INFO_DIR), reads back what was selected after its first read from each peer, logs it, and
warns (counting `tcp_fallback_warnings`) when it is TCP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from engine.processes import process_alive

log = logging.getLogger(__name__)

tcp_fallback_warnings = 0
REPORT_PREFIX = "pdserve-ucx-"  # then the pid of the process whose agent writes there, then a random part
_LABEL = re.compile(r'label="[^"\\]*\\n([^"]+)"')


def enable_proto_report() -> Path | None:
    """Ask UCX (before the agent is created) to write its READ protocol choices to a private directory, named
    after this process. Leaves an operator's own UCX_PROTO_INFO settings alone (returns None then)."""
    if "UCX_PROTO_INFO" in os.environ or "UCX_PROTO_INFO_DIR" in os.environ:
        return None
    remove_orphaned_reports()
    directory = Path(tempfile.mkdtemp(prefix=f"{REPORT_PREFIX}{os.getpid()}-"))
    os.environ["UCX_PROTO_INFO"] = "*get*"
    os.environ["UCX_PROTO_INFO_DIR"] = str(directory)
    return directory


def remove_orphaned_reports(parent: Path | None = None) -> int:
    """Remove the report directories of processes that are gone: an agent removes its own when it closes, but a
    process killed outright cannot. Returns how many were removed (each logged)."""
    removed = 0
    for path in (parent or Path(tempfile.gettempdir())).glob(f"{REPORT_PREFIX}*-*"):
        pid = path.name[len(REPORT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed += 1
            log.info("removed %s: UCX protocol reports of process %s, which is gone", path, pid)
    return removed


def disable_proto_report(directory: Path | None) -> None:
    """Stop further reports in this process (the variables are read when a UCX context is created)."""
    if directory is not None and os.environ.get("UCX_PROTO_INFO_DIR") == str(directory):
        del os.environ["UCX_PROTO_INFO"], os.environ["UCX_PROTO_INFO_DIR"]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """UCX also prints the protocol tables to stdout when it selects them; keep them out of ours."""
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def selected_read_transports(directory: Path | None, agent_name: str) -> set[str]:
    """Transports UCX selected so far for this agent's READs into local memory, e.g. {'cuda_ipc/cuda'}."""
    if directory is None or not directory.is_dir():
        return set()
    prefix = re.sub(r"[^A-Za-z0-9]", "_", agent_name)  # UCX writes the name that way
    # The open-ended size range ("..._<n>_inf.dot") is the protocol of bulk reads, i.e. of KV blocks.
    paths = list(directory.glob(f"{prefix}_*get*_inf.dot")) or list(directory.glob(f"{prefix}_*get*.dot"))
    found: set[str] = set()
    for path in paths:
        found.update(m.group(1) for m in _LABEL.finditer(path.read_text(errors="replace")))
    return found


def report_path(agent_name: str, local_mem: str, remote_mem: str, same_host: bool,
                transports: set[str], peer: str = "") -> None:
    """Log the transports of one read path; warn and count when a path that has a faster transport uses TCP.
    `peer`: the remote agent and its node (name@node_ip), named in the line."""
    global tcp_fallback_warnings
    where = "same host" if same_host else "cross-node"
    path = f"{remote_mem}->{local_mem} ({where})" + (f" from {peer}" if peer else "")
    if not transports:
        log.info("KV read path %s of %s: UCX did not report its transports", path, agent_name)
        return
    names = ", ".join(sorted(transports))
    if all(t.startswith("tcp") for t in transports):
        tcp_fallback_warnings += 1
        want = "cuda_ipc or RDMA (rc)" if "VRAM" in (local_mem, remote_mem) or not same_host else "shared memory"
        log.warning("KV read path %s of %s runs over TCP (%s): expect a small fraction of the link's bandwidth; "
                    "this path should use %s. Check UCX_TLS / kv_transfer.ucx_tls and the NICs/GPUs UCX sees.",
                    path, agent_name, names, want)
    else:
        log.info("KV read path %s of %s: UCX selected %s", path, agent_name, names)
