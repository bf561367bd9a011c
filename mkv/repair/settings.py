"""The service's configuration handed to the repair process: it needs all of it (the
ring, the timeouts, the rates), as JSON on its command line, without the redirect
secret and the tokens file, which it has no use for and `ps` would show."""

from __future__ import annotations

import dataclasses
import json

from mkv.config import Config

#: settings the repair process never needs: left out of its command line
WITHHELD = ("redirect_secret", "api_tokens_file")


def settings(cfg: Config) -> str:
    return json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in WITHHELD})


def from_settings(text: str) -> Config:
    raw = json.loads(text)
    fields = {f.name for f in dataclasses.fields(Config)}

    def tupled(v: object) -> object:
        return tuple(tupled(x) for x in v) if isinstance(v, list) else v

    return Config(**{k: tupled(v) for k, v in raw.items() if k in fields})
