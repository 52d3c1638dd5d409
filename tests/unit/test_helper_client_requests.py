"""The exec requests the client builds: a repeated call reuses its request, any difference in
what a call asks for makes a new one."""

from __future__ import annotations

from chroot_helper.client import _exec_request
from chroot_helper.protocol import Connection, Request, Role

NULL = {"stdin": "null", "stdout": "null", "stderr": "null"}


def received(request: Request) -> object:
    """The request as the helper reads it from the frame."""
    server = Connection(Role.SERVER)
    server.receive_data(Connection(Role.CLIENT).send(request))
    return server.next_event()


def test_the_same_call_reuses_its_request() -> None:
    first = _exec_request(["echo", "a"], dict(NULL), 0, None, False, None)
    assert _exec_request(["echo", "a"], dict(NULL), 0, None, False, None) is first
    assert received(first) == Request(
        op="exec", params={"command": "echo", "args": ["a"], **NULL, "started": False}
    )


def test_every_difference_reaches_the_helper() -> None:
    base = (["echo", "a"], NULL, 0, 1, True, None)
    variants = [
        (["echo", "b"], NULL, 0, 1, True, None),
        (["echo"], NULL, 0, 1, True, None),
        (["echo", "a"], {**NULL, "stdout": "fd"}, 1, 1, True, None),
        (["echo", "a"], {"stdout": "null", "stdin": "null", "stderr": "null"}, 0, 1, True, None),
        (["echo", "a"], NULL, 0, 1.0, True, None),
        (["echo", "a"], NULL, 0, True, True, None),
        (["echo", "a"], NULL, 0, None, True, None),
        (["echo", "a"], NULL, 0, 1, False, None),
        (["echo", "a"], NULL, 0, 1, True, "secret"),
    ]
    for argv, modes, fds, timeout, started, token in [base, *variants, base]:
        request = received(_exec_request(argv, dict(modes), fds, timeout, started, token))
        assert isinstance(request, Request)
        params = dict(request.params)
        assert (params.pop("command"), *params.pop("args")) == tuple(argv)
        assert params.pop("timeout", None) == timeout
        assert type(request.params.get("timeout")) is type(timeout)
        assert params.pop("started", True) is started
        assert params == modes
        assert list(params) == list(modes)
        assert (request.fds, request.token) == (fds, token)
