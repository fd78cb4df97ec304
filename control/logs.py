"""Log set-up for every process: plain text by default, one JSON object per line with `--log-format json`.

Every record carries a `request_id` ("-" when it is about no request). It comes from the
record's `extra={"request_id": ...}` (worker loops, which handle many requests in one thread)
or, in the router, from `current_request_id`: a context variable the HTTP edge sets for the
duration of one HTTP request, so every line logged while serving it names it. A context
variable is per task, not a global: concurrent requests each see their own id.
"""
from __future__ import annotations

import contextvars
import json
import logging
import time

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] [%(request_id)s] %(message)s"

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("pdserve_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id`: its own (from `extra`), the current HTTP request's, or "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "pid": record.process,
               "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configures the root logger of this process (replacing any handler set before)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


def rid(request_id: str) -> dict:
    """`extra=` for a log call about one request: `log.info("...", extra=rid(r))`."""
    return {"request_id": request_id}
