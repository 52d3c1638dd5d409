"""chroot-helper: the sibling daemon that serves jailed apps from outside the jail.

Jailed code imports only :mod:`chroot_helper.client`; everything else runs in the daemon.
"""

from __future__ import annotations

__all__: list[str] = []
