"""apache-config's validation and rendering, without Apache (the integration tests run it)."""

from __future__ import annotations

import pytest

from chrootwsgi import ConfigError
from chrootwsgi.apache_config import render, site_options
from chrootwsgi.wrapper import config_path, parse_app


def options(**changes):
    values = {"app": "myapp.wsgi:application", "root": "/srv/jail/myapp"}
    values.update(changes)
    return site_options(**values, python_home="/opt/chrootwsgi")


def test_defaults_name_the_group_and_config_after_the_app():
    site = options()
    assert site.name == "myapp"
    assert site.config == "/etc/chrootwsgi/myapp.toml"
    assert site.wrapper == "/opt/chrootwsgi/lib/python3.11/site-packages/chrootwsgi/wrapper.wsgi"


def test_config_file_name_gives_the_group_name():
    assert options(config="/etc/chrootwsgi/shop.toml").name == "shop"


def test_snippet_directives():
    text = render(options(static=("/static=/srv/myapp/static",), processes=3, threads=7))
    wrapper = "/opt/chrootwsgi/lib/python3.11/site-packages/chrootwsgi/wrapper.wsgi"
    assert (
        "WSGIDaemonProcess myapp user=www-data group=www-data \\\n    processes=3 threads=7" in text
    )
    assert (
        f"WSGIImportScript {wrapper} \\\n    process-group=myapp application-group=%{{GLOBAL}}"
        in (text)
    )
    assert f"WSGIScriptAlias / {wrapper} \\\n    process-group=myapp" in text
    assert "WSGIScriptReloading Off" in text
    assert "Alias /static /srv/myapp/static\n<Directory /srv/myapp/static>" in text
    assert "export CHROOTWSGI_CONFIG" not in text


def test_config_outside_the_wrappers_directory_says_how_to_pass_it():
    text = render(options(config="/srv/myapp/jail.toml"))
    assert "#     export CHROOTWSGI_CONFIG=/srv/myapp/jail.toml" in text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"app": "myapp.wsgi"}, "app = 'myapp.wsgi': expected \"module:callable\""),
        ({"root": "srv/jail"}, "--root 'srv/jail': give an absolute path"),
        ({"user": "root"}, "--user root: the jailed daemon must run as an ordinary user"),
        ({"user": "no-such-user-x"}, "--user 'no-such-user-x': no such user"),
        ({"group": "no-such-group-x"}, "--group 'no-such-group-x': no such group"),
        ({"threads": 0}, "--threads 0: give at least 1"),
        ({"static": ("static",)}, "--static 'static': expected URL=DIRECTORY"),
        ({"name": "my site"}, "--name 'my site': use letters, digits"),
        ({"mount": "app"}, "--mount 'app': give a URL path starting with '/'"),
    ],
)
def test_bad_values_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError) as error:
        options(**changes)
    assert message in str(error.value)


def test_wrapper_config_lookup(monkeypatch):
    monkeypatch.delenv("CHROOTWSGI_CONFIG", raising=False)
    monkeypatch.delenv("CHROOTWSGI_CONFIG_DIR", raising=False)
    assert config_path("shop") == "/etc/chrootwsgi/shop.toml"
    monkeypatch.setenv("CHROOTWSGI_CONFIG_DIR", "/srv/etc")
    assert config_path("shop") == "/srv/etc/shop.toml"
    monkeypatch.setenv("CHROOTWSGI_CONFIG", "/srv/site.toml")
    assert config_path("shop") == "/srv/site.toml"
    monkeypatch.delenv("CHROOTWSGI_CONFIG")
    with pytest.raises(ConfigError, match="set \\$CHROOTWSGI_CONFIG"):
        config_path(None)


def test_parse_app():
    assert parse_app("pkg.mod:app.wsgi_app") == ("pkg.mod", "app.wsgi_app")
