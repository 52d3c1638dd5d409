"""An ordinary Flask app with templates and static files; it knows nothing of chrootwsgi."""

from __future__ import annotations

import os

from flask import Flask, render_template

app = Flask(__name__)
DATA_DIR = os.environ.get("FLASK_SAMPLE_DATA", "/srv/flask-sample-data")


@app.route("/")
def index():
    try:
        with open(os.path.join(DATA_DIR, "greeting.txt")) as file:
            greeting = file.read().strip()
    except OSError as exc:
        greeting = f"no greeting: {exc.strerror}"
    return render_template(
        "index.html",
        greeting=greeting,
        uid=os.getuid(),
        listing=sorted(os.listdir("/")),
    )


@app.route("/passwd")
def passwd():
    with open("/etc/passwd") as file:
        return file.read(), 200, {"Content-Type": "text/plain"}
