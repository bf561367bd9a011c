"""gunicorn config file equivalent to `mkv serve`.

    MKV_CONFIG=/etc/mkv.conf gunicorn -c python:mkv.service.gunicorn_conf mkv.service.wsgi:app

Settings come from the mkv configuration (MKV_CONFIG file and MKV_* variables). This is
an entry point: the metrics directory must exist before prometheus_client is imported,
so it is made first (mkv.service.metricsdir).
"""

from mkv.service import metricsdir

metricsdir.share_between_workers()

from mkv.config import load as _load_config  # `config` is a gunicorn setting's name
from mkv.service.server import gunicorn_settings

wsgi_app = "mkv.service.wsgi:app"
globals().update(gunicorn_settings(_load_config([], prog="mkv serve")[0]))
