"""gunicorn config file equivalent to `mkv serve`.

    MKV_CONFIG=/etc/mkv.conf gunicorn -c python:mkv.gunicorn_conf mkv.wsgi:app

Settings come from the mkv configuration (MKV_CONFIG file and MKV_* variables).
"""

from mkv.server import get_config, gunicorn_settings

wsgi_app = "mkv.wsgi:app"
globals().update({k: v for k, v in gunicorn_settings(get_config()).items()})
