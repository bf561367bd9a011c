"""Talking to nginx volumes: typed errors (errors), HTTP on a kept-alive socket (wire),
the one client every process uses (pool), and the nginx config a volume runs (nginx)."""
