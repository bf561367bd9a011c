"""The HTTP service `mkv serve` runs: the Falcon app and its fast read path (app), the
key operations against index, writer and volumes (store), gunicorn settings and hooks
(server, gunicorn_conf, wsgi), metrics, and supervision of the writer and health
processes (supervise)."""
