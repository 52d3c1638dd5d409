"""A resident supervisor driven directly, as the daemon drives it: jobs it must refuse.

The daemon never sends a malformed job, but a resident must not trust that: it refuses the job,
closes what came with it, and runs the next job with that job's own descriptors.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tomllib

import pytest
from chroot_helper.config import parse_config
from chroot_helper.fdpass import scm_rights
from chroot_helper.privileges import CAP_SETGID, CAP_SETUID
from chroot_helper.protocol import Connection, Exit, Role, State
from chroot_helper.services.exec_calls import CommandTable
from chroot_helper.services.exec_forker import Forker
from chroot_helper.services.exec_resident import encode_job
from chroot_helper.services.exec_spawn import STATUS_ERROR, STATUS_EXIT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the resident drops to the command's user"
)

CONFIG = """
[helper]
socket = "/tmp/unused.sock"
allow_uids = [0]

[exec.echo]
argv = ["/bin/echo"]
args = "any"
"""


def job_with_client(channel: socket.socket, job: bytes) -> tuple[socket.socket, int]:
    """Send *job* with /dev/null as stdin and stderr, a pipe as stdout and a fresh client
    connection; return our end of the connection and the pipe's read end."""
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        channel.sendmsg([job], scm_rights([null, write_end, null, theirs.fileno()]))
    finally:
        for fd in (null, write_end):
            os.close(fd)
        theirs.close()
    return ours, read_end


def report(channel: socket.socket) -> bytes:
    channel.setblocking(True)
    channel.settimeout(10)
    return channel.recv(4096)


def test_a_malformed_job_is_refused_and_the_next_job_keeps_its_descriptors() -> None:
    table = CommandTable(parse_config(tomllib.loads(CONFIG)).commands)
    call = table.parse({"command": "echo", "args": ["next"]}, 0)
    spec = table.spec(call, [0, 1, 2])  # the descriptors travel beside the job, not in it
    forker = Forker.start(frozenset({CAP_SETUID, CAP_SETGID}), table, pool=False)

    async def resident() -> socket.socket:
        channel, state = await forker.resident(table.identities["echo"])
        state.close()
        return channel

    try:
        channel = asyncio.run(resident())
        # The client part of the job is malformed (a timeout that is no number), after the
        # resident has taken the client's descriptor.
        bad = json.loads(encode_job(spec, name="echo", started=False))
        bad["timeout"] = "soon"
        client, output = job_with_client(channel, json.dumps(bad).encode())
        assert report(channel) == STATUS_ERROR + b"malformed job"
        assert client.recv(100) == b""  # closed by the resident, unanswered
        client.close()
        os.close(output)

        # The same resident runs the next job, whose descriptors reuse the numbers just freed.
        good = encode_job(spec, name="echo", started=False)
        client, output = job_with_client(channel, good)
        assert report(channel)[:1] == STATUS_EXIT
        conn = Connection(Role.CLIENT)
        conn.our_state = conn.their_state = State.RUNNING
        conn.receive_data(client.recv(4096))
        assert conn.next_event() == Exit(returncode=0)
        assert os.read(output, 100) == b"next\n"
        client.close()
        os.close(output)
        channel.close()
    finally:
        forker.close()
        os.waitpid(forker.pid, 0)
