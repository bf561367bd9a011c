"""gunicorn config file equivalent to `mkv serve`.

    MKV_CONFIG=/etc/mkv.conf gunicorn -c python:mkv.service.gunicorn_conf mkv.service.wsgi:app

Settings come from the mkv configuration (MKV_CONFIG file and MKV_* variables). This is
an entry point: the metrics directory (beside the index, so the configuration is read
first) must be set before prometheus_client is imported (mkv.service.metricsdir).
"""

from mkv.config import load as _load_config  # `config` is a gunicorn setting's name
from mkv.service import metricsdir

_mkv_config = _load_config([], prog="mkv serve")[0]
metricsdir.share_between_workers(_mkv_config.db)

from mkv.service.server import gunicorn_settings

wsgi_app = "mkv.service.wsgi:app"
globals().update(gunicorn_settings(_mkv_config))
