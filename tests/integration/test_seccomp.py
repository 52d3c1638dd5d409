"""The syscall filter after entry: what it adds to the jail, and what keeps working."""

from __future__ import annotations

import pytest
from test_enter_jail import run_python

pytestmark = [pytest.mark.root]

PROBES = """
import ctypes, errno, socket, threading
libc = ctypes.CDLL(None, use_errno=True)

def call(number, *args):
    result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]

def in_child(action):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, action().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return os.read(read, 100).decode()

params = ctypes.create_string_buffer(120)
results = {
    # a traced process would stop at its next signal: trace a child that exits at once
    "ptrace_traceme": in_child(lambda: call(101, 0, 0, 0, 0)),
    "io_uring_setup": call(425, 1, ctypes.addressof(params)),
    "keyctl": call(250, 0, -3, 0),
    "clone3": call(435, 0, 0),
    "unshare_net": call(272, 0x40000000),
}
box = []
thread = threading.Thread(target=box.append, args=("ran",))
thread.start()
thread.join()
results["thread"] = box[0]
pid = os.fork()
if pid == 0:
    os._exit(7)
results["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
    results["netlink"] = "ok"
except OSError as exc:
    results["netlink"] = errno.errorcode[exc.errno]
# mod_wsgi's per-request lookup: with netlink denied, glibc assumes IPv4 and IPv6
results["addrconfig"] = sorted(
    {info[4][0] for info in socket.getaddrinfo("127.0.0.1", 80, 0, 0, 0, socket.AI_ADDRCONFIG)}
)
"""


def probe(root: str, *, seccomp: bool) -> dict[str, object]:
    return run_python(
        f"""
        state = chrootwsgi.enter_jail({root!r}, seccomp={seccomp})
        {PROBES.strip().replace(chr(10), chr(10) + " " * 8)}
        report(**results)
        """,
        user=33,
    )


def test_filter_denies_kernel_interfaces_with_eperm(jail_root):
    results = probe(jail_root, seccomp=True)
    assert results["ptrace_traceme"] == "EPERM"
    assert results["io_uring_setup"] == "EPERM"
    assert results["keyctl"] == "EPERM"
    assert results["unshare_net"] == "EPERM"
    assert results["clone3"] == "ENOSYS"  # libc falls back to clone, whose flags are checked
    assert results["thread"] == "ran"
    assert results["fork"] == 7
    assert results["netlink"] == "EAFNOSUPPORT"
    assert results["addrconfig"] == ["127.0.0.1"]


def test_without_the_filter_those_calls_reach_the_kernel(jail_root):
    results = probe(jail_root, seccomp=False)
    assert results["ptrace_traceme"] == "ok"
    assert results["io_uring_setup"] == "ok"
    assert results["keyctl"] != "EPERM"
    assert results["clone3"] != "ENOSYS"
    assert results["netlink"] == "ok"
    assert results["addrconfig"] == ["127.0.0.1"]
    assert results["thread"] == "ran"
    assert results["fork"] == 7
