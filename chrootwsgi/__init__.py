"""chrootwsgi: enter an empty chroot jail late in a WSGI worker, then keep serving."""

from __future__ import annotations

__all__: list[str] = []
