"""Run a command (as root) inside a user namespace where new user namespaces are disabled.

``user.max_user_namespaces`` is per user namespace: setting it to 0 in a child namespace makes
every ``unshare(CLONE_NEWUSER)`` below it fail with ENOSPC, exactly as on a host where an
administrator disabled them, while the host's own setting is untouched.

Usage: ``python userns_disabled.py COMMAND [ARGS...]`` (execs COMMAND; its PID is ours).
"""

from __future__ import annotations

import os
import sys

from chrootwsgi import linux


def main(argv: list[str]) -> None:
    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    parent = os.getpid()
    if os.fork() == 0:  # stays in the initial namespace to write our maps
        os.close(ready_write)
        os.read(ready_read, 1)
        for name, text in (
            ("uid_map", "0 0 65536"),
            ("setgroups", "allow"),
            ("gid_map", "0 0 65536"),
        ):
            with open(f"/proc/{parent}/{name}", "w") as file:
                file.write(text)
        os._exit(0)
    linux.unshare(linux.CLONE_NEWUSER)
    os.write(ready_write, b"x")
    os.waitpid(-1, 0)
    for fd in (ready_read, ready_write, done_read, done_write):
        os.close(fd)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    with open("/proc/sys/user/max_user_namespaces", "w") as file:
        file.write("0")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
