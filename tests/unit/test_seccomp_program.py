"""The seccomp program, run by a small classic-BPF interpreter over seccomp_data."""

from __future__ import annotations

import errno
import struct

import pytest

from chrootwsgi.seccomp import (
    CLONE_NAMESPACE_FLAGS,
    DENIED_X86_64,
    SIGNAL_X86_64,
    build_program,
)

ALLOW, ERRNO = 0x7FFF0000, 0x00050000
X86_64, I386 = 0xC000003E, 0x40000003


PID = 4242


def run(nr: int, *, arch: int = X86_64, arg0: int = 0) -> int:
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0 & (2**64 - 1), 0, 0, 0, 0, 0)
    program = build_program(PID)
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:
            return k
        else:
            taken = {
                0x15: accumulator == k,
                0x35: accumulator >= k,
                0x45: bool(accumulator & k),
            }[code]
            pc += jt if taken else jf


@pytest.mark.parametrize("name", sorted(DENIED_X86_64))
def test_denied_calls_get_eperm(name):
    assert run(DENIED_X86_64[name]) == ERRNO | errno.EPERM


@pytest.mark.parametrize("nr", [0, 1, 2, 3, 9, 39, 57, 58, 59, 105, 202, 231, 257, 318, 334])
def test_ordinary_calls_are_allowed(nr):
    assert run(nr) == ALLOW


def test_clone_with_a_namespace_flag_is_denied_and_without_allowed():
    threads = 0x3D0F00  # the flags glibc passes for a thread
    assert run(56, arg0=threads) == ALLOW
    for bit in range(32):
        flag = 1 << bit
        if flag & CLONE_NAMESPACE_FLAGS:
            assert run(56, arg0=threads | flag) == ERRNO | errno.EPERM


def test_clone3_answers_enosys_so_libc_falls_back_to_clone():
    assert run(435) == ERRNO | errno.ENOSYS


def test_netlink_sockets_answer_eafnosupport_and_other_families_are_allowed():
    assert run(41, arg0=16) == ERRNO | errno.EAFNOSUPPORT  # AF_NETLINK
    for family in (1, 2, 10, 17):  # AF_UNIX, AF_INET, AF_INET6, AF_PACKET
        assert run(41, arg0=family) == ALLOW


def test_other_abis_are_denied():
    assert run(1, arch=I386) == ERRNO | errno.EPERM
    assert run(0x40000000 + 1) == ERRNO | errno.EPERM  # x32


@pytest.mark.parametrize("name", sorted(SIGNAL_X86_64))
def test_signals_only_to_the_process_itself(name):
    nr = SIGNAL_X86_64[name]
    assert run(nr, arg0=PID) == ALLOW
    for target in (1, PID + 1, 0, -1, -PID):
        assert run(nr, arg0=target) == ERRNO | errno.EPERM, target


def test_every_jump_stays_inside_the_program():
    program = build_program(PID)
    assert program[-1][0] == 0x06, "the program must end in a return"
    for index, (code, jt, jf, _) in enumerate(program):
        if code & 0x07 == 0x05:  # BPF_JMP
            assert 0 <= jt <= 255 and 0 <= jf <= 255
            assert index + 1 + max(jt, jf) < len(program)
