"""A syscall filter for the jailed worker: deny what a web worker never needs, with EPERM.

A chroot limits the file system view; the kernel stays reachable. After entry,
:func:`install_filter` loads a small classic-BPF seccomp program (no library needed) that answers
``EPERM`` — an error the app can handle, not a kill — to the calls that rebuild a view or reach
into other processes or the kernel:

- mounts and roots: ``mount``, ``umount2``, ``pivot_root``, ``chroot``, the new mount API
  (``open_tree``, ``move_mount``, ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``,
  ``mount_setattr``);
- namespaces: ``unshare``, ``setns``, and ``clone`` with any namespace flag (``clone3`` answers
  ``ENOSYS``, because its flags cannot be inspected, so that libc falls back to ``clone``);
- other processes: ``ptrace``, ``process_vm_readv``, ``process_vm_writev``; signals
  (``kill``, ``tgkill``, ``rt_sigqueueinfo``, ``rt_tgsigqueueinfo``) to any process but the
  worker itself, ``tkill`` and ``pidfd_send_signal`` — a jailed worker shares its uid with its
  sibling workers (and maybe other sites), which plain signals would reach;
- kernel interfaces: ``bpf``, ``perf_event_open``, ``keyctl``, ``add_key``, ``request_key``,
  ``kexec_load``, ``kexec_file_load``, ``init_module``, ``finit_module``, ``delete_module``,
  ``userfaultfd``, ``open_by_handle_at``, ``io_uring_setup``, ``io_uring_enter``,
  ``io_uring_register``;
- netlink sockets: ``socket(AF_NETLINK, ...)`` answers ``EAFNOSUPPORT``, as on a kernel built
  without netlink. Routing, firewall and audit sockets are kernel surface a web worker never
  needs; and glibc's ``getaddrinfo`` with ``AI_ADDRCONFIG`` (mod_wsgi calls it for every request)
  then assumes both IPv4 and IPv6 instead of asking the kernel for every address, about 16 us
  per call;
- any call through another ABI (i386 ``int 0x80``, x32).

The filter is inherited by every thread started later and by every child, and cannot be removed.
The worker's pid is part of it: a child the worker forks can signal the worker but not itself,
and the worker cannot signal its children (the jail has no programs to run; the helper runs them).
It needs ``no_new_privs`` (set by entry before it). Only x86-64 is supported; elsewhere set
``seccomp = false``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from . import linux
from .errors import EntryError

PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
SECCOMP_MODE_FILTER = 2

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

# Classic BPF opcodes.
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

# Offsets in struct seccomp_data.
_NR, _ARCH, _ARG0_LOW = 0, 4, 16

#: x86-64 numbers of the denied calls.
DENIED_X86_64 = {
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "unshare": 272,
    "setns": 308,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "bpf": 321,
    "perf_event_open": 298,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "userfaultfd": 323,
    "open_by_handle_at": 304,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "tkill": 200,
    "pidfd_send_signal": 424,
}
#: x86-64 numbers of the calls that signal a process named by their first argument; allowed
#: only when that is the calling process itself.
SIGNAL_X86_64 = {"kill": 62, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297}
_CLONE, _CLONE3 = 56, 435
_SOCKET, _AF_NETLINK = 41, 16
#: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
CLONE_NAMESPACE_FLAGS |= 0x20000000 | 0x40000000


Instruction = tuple[int, int, int, int]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Assembler:
    """Classic BPF with forward jumps to named labels, resolved by :meth:`assemble`."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, str | None, str | None]] = []
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, offset, None, None))

    def jump(self, op: int, k: int, *, true: str | None = None, false: str | None = None) -> None:
        self._code.append((op, k, true, false))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def ret(self, value: int) -> None:
        self._code.append((_RET_K, value, None, None))

    def assemble(self) -> list[Instruction]:
        def offset(index: int, target: str | None) -> int:
            return 0 if target is None else self._labels[target] - index - 1

        return [
            (op, offset(index, true), offset(index, false), k)
            for index, (op, k, true, false) in enumerate(self._code)
        ]


def build_program(pid: int) -> list[Instruction]:
    """The filter for a process whose pid is *pid*, as ``(code, jt, jf, k)`` instructions."""
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ_K, _AUDIT_ARCH_X86_64, false="deny")
    asm.load(_NR)
    asm.jump(_JGE_K, _X32_SYSCALL_BIT, true="deny")
    for number in sorted(DENIED_X86_64.values()):
        asm.jump(_JEQ_K, number, true="deny")
    asm.jump(_JEQ_K, _CLONE3, true="enosys")
    for number in SIGNAL_X86_64.values():
        asm.jump(_JEQ_K, number, true="own_pid")
    asm.jump(_JEQ_K, _SOCKET, true="socket")
    asm.jump(_JEQ_K, _CLONE, false="allow")
    asm.load(_ARG0_LOW)
    asm.jump(_JSET_K, CLONE_NAMESPACE_FLAGS, true="deny", false="allow")
    asm.label("own_pid")  # a signal: only to this process itself
    asm.load(_ARG0_LOW)
    asm.jump(_JEQ_K, pid, true="allow", false="deny")
    asm.label("socket")  # any family but netlink
    asm.load(_ARG0_LOW)
    asm.jump(_JEQ_K, _AF_NETLINK, true="eafnosupport", false="allow")
    asm.label("allow")
    asm.ret(_RET_ALLOW)
    asm.label("deny")
    asm.ret(_RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.ret(_RET_ERRNO | errno.ENOSYS)
    asm.label("eafnosupport")
    asm.ret(_RET_ERRNO | errno.EAFNOSUPPORT)
    return asm.assemble()


def install_filter() -> None:
    """Load the filter into the calling (single) thread; inherited by all it creates.

    :raises EntryError: on an architecture without a syscall table here, or when the kernel
        refuses the filter.
    """
    machine = platform.machine()
    if machine != "x86_64":
        raise EntryError(
            f"the syscall filter knows x86-64 only, this is {machine}: set seccomp = false"
        )
    program = build_program(os.getpid())
    packed = b"".join(struct.pack("<HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(packed, len(packed))
    fprog = _SockFprog(len(packed) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    try:
        linux.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
    except OSError as exc:
        raise EntryError(
            f"the kernel refused the syscall filter ({exc}); set seccomp = false to run without"
        ) from None


def filter_active() -> bool:
    """True when a seccomp filter is in force for the calling thread."""
    return linux.prctl(PR_GET_SECCOMP) == SECCOMP_MODE_FILTER
