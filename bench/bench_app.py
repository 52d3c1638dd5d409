"""The app the jail-overhead benchmark serves: a hello-world and a 50 KB page."""

from __future__ import annotations

import json

from chrootwsgi import current_state

PAGE = ("<p>" + "x" * 96 + "</p>\n") * 500  # 50,000 bytes


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/page":
        body = PAGE.encode()
    elif path == "/state":
        state = current_state()
        body = json.dumps(
            {
                "pid": state.pid,
                "seconds": state.seconds,
                "timings": state.timings,
                "snapshot": state.snapshot_origin,
            }
            if state
            else {}
        ).encode()
    else:
        body = b"Hello, world!\n"
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body)))])
    return [body]
