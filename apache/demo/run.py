"""``make demo``: Apache + mod_wsgi (daemon mode, www-data) serving a demo app from an empty jail.

Creates an empty jail directory, writes an Apache configuration to a temporary directory, starts
Apache in the foreground on 127.0.0.1 and serves until Ctrl-C. ``--check`` fetches the page once,
prints it as text and stops. Needs root (Apache binds, then runs its daemon as www-data).
"""

from __future__ import annotations

import argparse
import html
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "integration"))

from apache_server import Apache, Site  # noqa: E402

JAIL = "/tmp/chrootwsgi-demo-jail"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fetch the page once and stop")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("make demo needs root: Apache starts as root and runs its daemon as www-data")
    os.makedirs(JAIL, mode=0o755, exist_ok=True)
    os.chown(JAIL, 0, 0)
    os.chmod(JAIL, 0o755)
    script = textwrap.dedent(
        f"""\
        from chrootwsgi import ChrootMiddleware
        from demo_app import application as demo
        application = ChrootMiddleware(demo, root={JAIL!r})
        """
    )
    apache = Apache(Site(script=script, python_path=(str(HERE),)))
    apache.port = args.port
    with apache:
        page = apache.get("/")
        text = re.sub(r"<[^>]+>", " ", html.unescape(page.text.replace("</tr>", "\n")))
        print(f"demo: {apache.url('/')} (jail {JAIL}, empty on disk: {os.listdir(JAIL) == []})")
        lines = (" ".join(line.split()) for line in text.splitlines())
        print(f"HTTP {page.status_code}\n" + "\n".join(lines))
        if args.check:
            return 0 if page.status_code == 200 else 1
        print("serving; Ctrl-C stops Apache")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
