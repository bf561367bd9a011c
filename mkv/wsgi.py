"""WSGI entry point: `gunicorn -c python:mkv.gunicorn_conf mkv.wsgi:app`."""

from mkv.api import create_app
from mkv.server import get_config, worker_store

app = create_app(get_config(), worker_store)
