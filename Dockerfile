# The mkv service (index + API). Volumes are the stock nginx image; see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The dependencies first, from setup.cfg alone, so a change to the source reuses this layer.
# Every dependency ships manylinux wheels (apsw included), so the slim image needs no compiler.
COPY setup.cfg ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'])" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /index --shell /usr/sbin/nologin mkv \
    && mkdir -p /index \
    && chown mkv:mkv /index

# A named volume mounted on /index starts as a copy of this directory, ownership included, so
# the unprivileged service can create its SQLite files there.
USER mkv
WORKDIR /index
EXPOSE 3000

# Volumes come from MKV_VOLUMES or --volumes (compose passes them on the command line).
CMD ["mkv", "serve", "--bind", "0.0.0.0", "--port", "3000", "--db", "/index/mkv.db"]
