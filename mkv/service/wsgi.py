"""WSGI entry point: `gunicorn -c python:mkv.service.gunicorn_conf mkv.service.wsgi:app`.

The configuration comes from MKV_CONFIG and MKV_* variables, like the config file's."""

from mkv import config
from mkv.service.server import worker_app

app = worker_app(config.load([], prog="mkv serve")[0])
