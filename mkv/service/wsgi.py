"""WSGI entry point: `gunicorn -c python:mkv.service.gunicorn_conf mkv.service.wsgi:app`.

The configuration comes from MKV_CONFIG and MKV_* variables, like the config file's, as
the master read it (at start, and again on SIGHUP)."""

from mkv import config
from mkv.service.server import published_config, worker_app

# a worker forked by an mkv master runs the master's configuration (a reload's decision)
app = worker_app(published_config() or config.load([], prog="mkv serve")[0])
