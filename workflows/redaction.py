"""Keep credentials out of logs, error messages and MLflow.

Secrets are collected from the environment (the standard AWS variables, MLflow
tracking passwords and tokens) plus anything registered at run time, and are
replaced by ``***`` wherever text leaves the process: log records (a filter on
every handler, so third-party loggers such as botocore at DEBUG are covered too),
exception messages and URIs (user info is dropped).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from urllib.parse import urlsplit, urlunsplit

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
MASK = "***"
_registered: set[str] = set()
# SigV4 "Credential=AKID/date/region/s3/aws4_request" and query-string signing
_PATTERNS = (
    re.compile(r"(Credential=)[^/\s,&\"']+"),
    re.compile(r"(X-Amz-Credential=)[^&\s\"']+"),
    re.compile(r"(X-Amz-Signature=)[0-9a-fA-F]+"),
    re.compile(r"(X-Amz-Security-Token=)[^&\s\"']+"),
    re.compile(r"(Signature=)[0-9a-fA-F]{16,}"),
    re.compile(r"((?:aws_secret_access_key|aws_access_key_id|aws_session_token)['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+",
               re.IGNORECASE),
)


def register_secret(value: str | None) -> None:
    """Mask ``value`` from now on (ignored when empty or too short to be a secret)."""
    if value and len(value) >= 4:
        _registered.add(value)


def secrets() -> set[str]:
    out = set(_registered)
    for name in SECRET_ENV_VARS:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            out.add(v)
    return out


def redact(text: object) -> str:
    s = str(text)
    for secret in sorted(secrets(), key=len, reverse=True):
        if secret in s:
            s = s.replace(secret, MASK)
    for pat in _PATTERNS:
        s = pat.sub(lambda m: m.group(1) + MASK, s)
    return s


def redact_uri(uri: str | None) -> str | None:
    """The URI without user info or secret query parameters (``s3://k:s@b/p`` -> ``s3://b/p``)."""
    if uri is None:
        return None
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact(uri)
    if not (parts.username or parts.password):
        return redact(uri)  # untouched: urlunsplit would mangle sqlite:////abs/path
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return redact(urlunsplit(parts._replace(netloc=host)))


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: still redact what is there
            msg = f"{record.msg} {record.args}"
        record.msg = redact(msg)
        record.args = None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(level: int | str = logging.INFO, *, fmt: str | None = None) -> None:
    """Configure the root logger once with a redacting stderr handler; adds the
    filter to every handler already there (Ray and MLflow install their own)."""
    root = logging.getLogger()
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root.setLevel(level)
    if not any(getattr(h, "_birkhoff", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._birkhoff = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    protect_handlers()


def protect_handlers() -> None:
    """Add the filter to every handler of every logger configured so far."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            if not any(isinstance(f, RedactingFilter) for f in h.filters):
                h.addFilter(RedactingFilter())
