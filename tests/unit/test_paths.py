"""Host paths in the environ become jail paths; paths the jail cannot see are removed."""

from __future__ import annotations

from chrootwsgi import PathMapper

MAPPER = PathMapper(
    [
        ("/srv/jail", "/"),
        ("/srv/app/static", "/static"),
        ("/srv/app/static/big", "/big"),
        ("/srv/app/app.wsgi", "/srv/app/app.wsgi"),
    ]
)


def test_to_jail_uses_the_longest_prefix():
    assert MAPPER.to_jail("/srv/jail/html/index.html") == "/html/index.html"
    assert MAPPER.to_jail("/srv/jail") == "/"
    assert MAPPER.to_jail("/srv/app/static/css/a.css") == "/static/css/a.css"
    assert MAPPER.to_jail("/srv/app/static/big/file") == "/big/file"
    assert MAPPER.to_jail("/srv/app/app.wsgi") == "/srv/app/app.wsgi"


def test_to_jail_refuses_what_the_jail_cannot_see():
    assert MAPPER.to_jail("/etc/passwd") is None
    assert MAPPER.to_jail("/srv/jailbreak") is None  # a prefix of the name, not of the path
    assert MAPPER.to_jail("/srv/app/static/../secret") is None
    assert MAPPER.to_jail("relative/path") is None


def test_to_host_reverses():
    assert MAPPER.to_host("/static/css/a.css") == "/srv/app/static/css/a.css"
    assert MAPPER.to_host("/html") == "/srv/jail/html"


def test_rewrite_environ():
    environ = {
        "DOCUMENT_ROOT": "/srv/app/static",
        "CONTEXT_DOCUMENT_ROOT": "/srv/jail/html",
        "SCRIPT_FILENAME": "/srv/app/app.wsgi",
        "PATH_TRANSLATED": "/var/www/secret.txt",
        "PATH_INFO": "/srv/jail/not-a-file-path",
    }
    MAPPER.rewrite(environ)
    assert environ == {
        "DOCUMENT_ROOT": "/static",
        "CONTEXT_DOCUMENT_ROOT": "/html",
        "SCRIPT_FILENAME": "/srv/app/app.wsgi",
        "PATH_INFO": "/srv/jail/not-a-file-path",
    }
