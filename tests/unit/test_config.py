"""Configuration is validated up front; every error names the key, the value and the fix."""

from __future__ import annotations

import os

import pytest

from chrootwsgi import ConfigError, Exposure, load_config


@pytest.fixture
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("jail")
    # pytest's base directory is private to root; the jail checks only owner and write bits.
    path.chmod(0o755)
    return str(path)


def test_keyword_arguments(root):
    config = load_config(root=root, mode="rootless", tmp="", hosts={"db.test": "127.0.0.2"})
    assert config.root == root
    assert config.mode == "rootless"
    assert config.tmp == ""
    assert config.hosts == {"db.test": "127.0.0.2"}
    assert config.nameservers == ("127.0.0.1",)


def test_toml_file_and_overrides(root, tmp_path, monkeypatch):
    exposed = tmp_path / "static"
    exposed.mkdir()
    path = tmp_path / "jail.toml"
    path.write_text(
        f"""
root = "{root}"
tmp = "16M"
[[expose]]
host = "{exposed}"
jail = "/static"
[preload]
modules = ["decimal"]
[paths]
"/var/www/html" = "/html"
"""
    )
    monkeypatch.setenv("CHROOTWSGI_CONFIG", str(path))
    config = load_config(tmp="32M")
    assert config.tmp == "32M"
    assert config.expose == (Exposure(host=str(exposed), jail="/static", writable=False),)
    assert config.preload_modules == ("decimal",)
    assert config.path_map == {"/var/www/html": "/html"}


def test_exposure_shorthand(root, tmp_path):
    config = load_config(root=root, expose=[f"{tmp_path}:/uploads:rw", str(tmp_path)])
    assert config.expose == (
        Exposure(host=str(tmp_path), jail="/uploads", writable=True),
        Exposure(host=str(tmp_path), jail=str(tmp_path), writable=False),
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, 'no jail root given: set root = "/srv/jail"'),
        ({"root": "relative/jail"}, "root = 'relative/jail': give an absolute path"),
        ({"root": "/no/such/jail"}, "root '/no/such/jail' does not exist: create it with"),
        ({"mode": "chroot"}, "mode = 'chroot': expected one of 'auto', 'rootless', 'privileged'"),
        ({"tmp": "lots"}, "tmp = 'lots': expected a size such as \"64M\""),
        ({"user": "no-such-user-here"}, "user 'no-such-user-here': no such user"),
        ({"user": "root"}, "user 'root' would keep the jailed worker root"),
        ({"mode": "privileged"}, "mode 'privileged' needs user = \"NAME\""),
        ({"devices": ["sda"]}, "devices: 'sda' is not offered"),
        ({"expose": ["/no/such/dir"]}, "expose.host '/no/such/dir' does not exist"),
        (
            {"expose": [{"host": "/tmp", "jail": "/"}]},
            "on the jail root '/': choose a sub-directory",
        ),
        ({"colour": "blue"}, "unknown setting 'colour'"),
    ],
)
def test_invalid_settings_are_explained(root, options, message):
    options = {"root": root, **options} if "root" not in options and options != {} else options
    with pytest.raises(ConfigError) as raised:
        load_config(**options)
    assert message in str(raised.value)


def test_root_writable_by_others_is_refused(root):
    os.chmod(root, 0o775)
    with pytest.raises(ConfigError, match=r"writable by others \(mode 0775\).*chmod 755"):
        load_config(root=root)


def test_root_not_owned_by_root_is_refused(root):
    os.chown(root, 33, 33)
    with pytest.raises(ConfigError, match="owned by uid 33"):
        load_config(root=root)


def test_symlinked_root_is_refused(root, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(root)
    with pytest.raises(ConfigError, match="is a symlink: give the real path"):
        load_config(root=str(link))


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("root = \n")
    with pytest.raises(ConfigError, match=f"config file '{path}' is not valid TOML"):
        load_config(str(path))


def test_unknown_preload_key_in_file(root, tmp_path):
    path = tmp_path / "jail.toml"
    path.write_text(f'root = "{root}"\n[preload]\nlibs = ["x"]\n')
    with pytest.raises(ConfigError, match="unknown setting preload.libs"):
        load_config(str(path))
