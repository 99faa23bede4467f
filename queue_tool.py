"""queue_tool: a tiny durable job-queue service (one WSGI module, no framework).

A client POSTs a batch of work items and gets one token per valid item; it then
follows each job with that token until it is done.

Routes:
    POST   /api             submit a batch: [{"item": "...", "valor": seconds}, ...]
    GET    /check/<token>   follow a job (?wait=S long-polls up to 30 s)
    DELETE /check/<token>   cancel a queued or running job
    POST   /check/<token>/retry   run a failed or canceled job again
    POST   /jobs/retry, /jobs/cancel   the same for every job of a status (and queue)
    GET    /batch/<id>      follow a batch (?wait=S); DELETE cancels its unfinished jobs
    GET    /jobs            list jobs, newest first (?status=, ?limit=, ?before=)
    PUT    /schedules/<n>   create or replace a recurring job (cron or every S seconds);
                            GET and DELETE it; GET /schedules lists them
    GET    /health          liveness and queue depth
    GET    /metrics         Prometheus text format
    GET    /openapi.json    the OpenAPI 3.1 description of all of the above
    GET    /                the dashboard: a live page that shows and steers the queue

Run it:     python queue_tool.py --port 8000 --db queue_tool.sqlite3
Work only:  python queue_tool.py worker --process tasks:run   (no port)
Embed it:   gunicorn queue_tool:app   (configured from QUEUE_TOOL_* variables)
Build one:  queue_tool.make_app(db="jobs.sqlite3", workers=4, process=my_function)

Jobs live in an SQLite file (one machine), or in PostgreSQL when `db` is a
postgresql:// URL (any number of machines; pip install 'queue_tool[postgres]').
Worker threads claim them atomically, so any number of processes may share one
database. Delivery is at-least-once: a job whose process dies mid-run is run again.

Caveat: `python queue_tool.py` serves with the standard library's threaded
`wsgiref` server, which is fine for small deployments and development. For more
traffic, run the module-level `app` under gunicorn or waitress, or put a proxy in
front of it.
"""

__version__ = "0.2.0"
__all__ = [
    "ITEM_SCHEMA",
    "ApiError",
    "App",
    "Client",
    "ClientError",
    "NewJob",
    "PostgresStore",
    "Retry",
    "Runner",
    "SQLiteStore",
    "Settings",
    "SettingsError",
    "StoreError",
    "app",
    "main",
    "make_app",
]

import argparse
import base64
import bisect
import collections
import contextlib
import copy
import dataclasses
import datetime
import decimal
import errno
import functools
import hashlib
import heapq
import hmac
import html
import http
import http.client
import http.server
import importlib
import io
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import weakref
import wsgiref.simple_server
import zoneinfo
from queue import SimpleQueue

import jsonschema

log = logging.getLogger(__name__)


# -- Settings ----------------------------------------------------------------

ENV_PREFIX = "QUEUE_TOOL_"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the service. Durations are in seconds."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "queue_tool.sqlite3"
    workers: int = 16
    max_valor: float = 3600
    max_items: int = 1000
    max_body: int = 1 << 20
    max_queued: int = 100_000
    max_attempts: int = 3
    lease: float = 30
    retention: float = 7 * 86400
    grace: float = 10
    api_key: str = None
    debug: bool = False
    process: str = None  # module:function; None is the built-in wait_valor
    queues: str = None  # comma-separated queue names; None takes every queue
    retries: int = 0
    retry_delay: float = 1
    max_delay: float = 30 * 86400
    store_timeout: float = 5  # the longest a request waits for the store
    pooler: str = "none"  # what stands between us and PostgreSQL: see POOLERS
    listen_db: str = None  # the listener's own PostgreSQL URL; None: the db URL
    schedules: str = None  # a JSON file of schedules to apply at start-up
    timeout: float = None  # seconds one run may take, when the item sets none
    log_level: str = "info"  # one of LOG_LEVELS
    log_format: str = "text"  # one of LOG_FORMATS
    max_connections: int = 1000  # the built-in server's open connections, at most
    keepalive: float = 5  # seconds the built-in server keeps an idle connection open

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check_setting(field.name, value)
            if field.name == "db":
                object.__setattr__(self, "db", os.fspath(value))
        if not is_postgres_url(self.db) and (self.listen_db or self.pooler != "none"):
            raise SettingsError("listen_db and pooler are for a PostgreSQL db")

    def __repr__(self):
        # Neither the API key nor a database password ever reaches a log.
        shown = ", ".join(f"{field.name}={redact(getattr(self, field.name))!r}"
                          for field in dataclasses.fields(self) if field.name != "api_key")
        return f"Settings({shown})"


def is_postgres_url(db):
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def redact(db):
    """`db` with any password replaced by ***: what logs and messages may show."""
    if not is_postgres_url(db):
        return db
    parts = urllib.parse.urlsplit(db)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    query = "&".join("password=***" if pair.partition("=")[0].lower() == "password" else pair
                     for pair in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=userinfo + at + hostinfo, query=query))


def _passwords(db):
    """Every spelling of the passwords in a URL, longest first, to scrub from messages."""
    parts = urllib.parse.urlsplit(db)
    found = {parts.password} if parts.password else set()
    found |= {value for name, value in urllib.parse.parse_qsl(parts.query)
              if name.lower() == "password" and value}
    found |= {urllib.parse.unquote(secret) for secret in found}
    found |= {urllib.parse.quote(secret, safe="") for secret in found}
    return sorted(found, key=len, reverse=True)


SETTING_HELP = {
    "host": "address to listen on",
    "port": "port to listen on (0 picks a free one)",
    "db": "SQLite file holding the jobs (:memory: keeps nothing on disk),"
          " or a postgresql:// URL",
    "workers": "worker threads in this process (0: accept jobs, run none)",
    "max_valor": "largest accepted valor, in seconds",
    "max_items": "most items in one batch",
    "max_body": "largest request body, in bytes",
    "max_queued": "most queued jobs before submissions get 503",
    "max_attempts": "starts before a job whose worker was lost is failed",
    "lease": "seconds a running job's claim lasts without renewal",
    "retention": "seconds finished jobs are kept",
    "grace": "seconds running jobs get to finish on shutdown",
    "api_key": "bearer key for POST /api, DELETE /check and /batch, /jobs, /metrics",
    "debug": "tracebacks in the log and in 500 bodies",
    "process": "module:function that runs each job (default: wait valor seconds)",
    "queues": "comma-separated queues this process's workers take (default: every queue)",
    "retries": "retries of a job whose processor raised, when the item sets none",
    "retry_delay": "seconds before the first retry; each next one waits twice as long",
    "max_delay": "largest accepted delay of an item, in seconds",
    "store_timeout": "seconds a request waits for the store before it answers 503",
    "pooler": "what db goes through: none, session (a session-mode pool: the same) or"
              " transaction (PgBouncer's transaction mode, most managed pools)",
    "listen_db": "PostgreSQL URL of the listener's own session, direct or a session-mode"
                 " pool; none: the db URL",
    "schedules": "JSON file of schedules ({name: schedule}) to create or replace at start-up",
    "timeout": "seconds one run may take, when the item sets none (default: no limit)",
    "log_level": "least level logged: debug, info, warning or error (--debug: debug)",
    "log_format": "text, or json: one JSON object per line",
    "max_connections": "most connections the built-in server holds open at once; more"
                       " wait in the listen backlog",
    "keepalive": "seconds the built-in server keeps an idle connection open",
}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# A direct connection and a session-mode pool keep a server session per client: the
# store prepares its statements there. Behind a transaction-mode pool it prepares
# none, and LISTENs only on listen_db.
POOLERS = ("none", "session", "transaction")

# Bounds (inclusive) of the numeric settings; a lease must also be above 0.
_MINIMUM = {"port": 0, "workers": 0, "max_valor": 0, "max_items": 1, "max_body": 1,
            "max_queued": 1, "max_attempts": 1, "retention": 0, "grace": 0, "retries": 0,
            "retry_delay": 0, "max_delay": 0, "max_connections": 1}
MAX_RETRIES = 25
_MAXIMUM = {"port": 65535, "workers": 1024, "retries": MAX_RETRIES,
            "max_connections": 1_000_000}
_POSITIVE = {"lease", "store_timeout", "keepalive"}


PROCESS_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
# A queue name. The item schema says the same as an ECMA-262 pattern (see below).
QUEUE_PATTERN = "^[a-z0-9][a-z0-9_.-]{0,63}$"
QUEUE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
DEFAULT_QUEUE = "default"
_SETTING_TYPES = {field.name: field.type for field in dataclasses.fields(Settings)}


def _check_setting(name, value):
    kind = _SETTING_TYPES[name]
    if name == "api_key":
        if value is not None and (not isinstance(value, str) or not value):
            raise SettingsError("api_key must be a non-empty string")
    elif name == "db":
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise SettingsError("db must be a file path, :memory: or a postgresql:// URL")
    elif name == "schedules":
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not value):
            raise SettingsError("schedules must be the path of a JSON file")
    elif name == "process":
        if value is not None and (not isinstance(value, str) or not PROCESS_RE.match(value)):
            raise SettingsError(f"process must be module:function, not {value!r}")
    elif name == "timeout":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (0 < value < math.inf)):
            raise SettingsError(f"timeout must be a number of seconds above 0, not {value!r}")
    elif name in ("log_level", "log_format"):
        choices = LOG_LEVELS if name == "log_level" else LOG_FORMATS
        if value not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    elif name == "pooler":
        if value not in POOLERS:
            raise SettingsError(f"pooler must be one of {', '.join(POOLERS)}, not {value!r}")
    elif name == "listen_db":
        if value is not None and not is_postgres_url(value):
            raise SettingsError("listen_db must be a postgresql:// URL")
    elif name == "queues":
        if value is not None and (not isinstance(value, str) or not all(
                QUEUE_RE.match(queue) for queue in value.split(","))):
            raise SettingsError(f"queues must be queue names separated by commas, not {value!r}")
    elif kind is str:
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{name} must be a non-empty string")
    elif kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{name} must be true or false")
    else:
        whole = kind is int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                whole and not isinstance(value, int)):
            raise SettingsError(f"{name} must be {'a whole' if whole else 'a'} number, "
                                f"not {value!r}")
        if not math.isfinite(value):
            raise SettingsError(f"{name} must be a finite number, not {value!r}")
        low, high = _MINIMUM.get(name), _MAXIMUM.get(name)
        if name in _POSITIVE and value <= 0:
            raise SettingsError(f"{name} must be above 0, not {value!r}")
        if low is not None and value < low:
            raise SettingsError(f"{name} must be at least {low}, not {value!r}")
        if high is not None and value > high:
            raise SettingsError(f"{name} must be at most {high}, not {value!r}")


def parse_setting(name, text):
    """Convert one flag or variable string to the setting's type (SettingsError if not)."""
    kind = _SETTING_TYPES[name]
    text = text.strip()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be true or false, not {text!r}")
    if name == "timeout" and text.lower() in ("", "none"):
        return None
    if kind in (int, float):
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            word = "a whole number" if kind is int else "a number"
            raise SettingsError(f"{name} must be {word}, not {text!r}") from None
    return text if text or name not in ("api_key", "process", "queues", "listen_db",
                                        "schedules") else None


def settings_from_env(environ=None, **overrides):
    """Settings from QUEUE_TOOL_* variables, with `overrides` on top.

    Raises SettingsError naming the variable at fault.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(Settings):
        variable = ENV_PREFIX + field.name.upper()
        if variable in environ:
            try:
                value = parse_setting(field.name, environ[variable])
                _check_setting(field.name, value)
            except SettingsError as exc:
                raise SettingsError(f"{variable}: {exc}") from None
            if value is not None:
                values[field.name] = value
    values.update(overrides)
    return Settings(**values)


def load_process(spec):
    """The callable a `module:function` setting names (SettingsError if there is none).

    The module is looked for on sys.path, then in the working directory, so
    `--process tasks:run` finds ./tasks.py without any wiring code.
    """
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target = importlib.import_module(module_name)
        for part in name.split("."):
            target = getattr(target, part)
    except Exception as exc:  # noqa: BLE001 - a module may raise anything as it loads
        raise SettingsError(f"process: cannot load {spec!r}: {type(exc).__name__}: {exc}"
                            ) from None
    if not callable(target):
        raise SettingsError(f"process: {spec!r} is not callable")
    return target


# -- Schema ------------------------------------------------------------------

# A unique job key, and an Idempotency-Key: printable ASCII, as an ECMA-262 pattern.
KEY_PATTERN = "^[\\x20-\\x7e]{1,255}$"


def item_schema(max_valor=Settings.max_valor, max_delay=Settings.max_delay):
    """The JSON Schema one batch item must match."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Item",
        "type": "object",
        "properties": {
            "item": {"type": "string", "minLength": 1, "maxLength": 1000,
                     "description": "what to work on"},
            "valor": {"type": "number", "minimum": 0, "maximum": max_valor,
                      "description": "the job's cost in seconds"},
            "delay": {"type": "number", "minimum": 0, "maximum": max_delay,
                      "description": "seconds to wait before the first start"},
            "priority": {"type": "integer", "minimum": -10, "maximum": 10, "default": 0,
                         "description": "higher runs first"},
            "queue": {"type": "string", "pattern": QUEUE_PATTERN, "default": DEFAULT_QUEUE,
                      "description": "only workers taking this queue run the job"},
            "retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES,
                        "description": "more runs after the processor raised"
                                       " (default: the retries setting)"},
            "unique": {"type": "string", "pattern": KEY_PATTERN,
                       "description": "a job key: while a job with it is queued or running,"
                                      " an item with the same key queues nothing"},
            "unique_for": {"type": "number", "exclusiveMinimum": 0, "maximum": max_delay,
                           "description": "seconds a job with this key also keeps an item"
                                          " with it out after it was created, in any state"},
            "expires": {"type": "number", "exclusiveMinimum": 0, "maximum": max_delay,
                        "description": "seconds after its first run_at that a job not yet"
                                       " started is canceled instead"},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": max_valor,
                        "description": "seconds one run may take (default: the timeout"
                                       " setting): then it fails, \"timed out after S s\""},
        },
        "required": ["item", "valor"],
        "dependentRequired": {"unique_for": ["unique"]},
    }


def ecma_regex(pattern):
    r"""A JSON Schema (ECMA-262) pattern as a Python regex.

    The one difference that matters here: ECMA's `$` is the end of the input,
    while Python's also matches before a final newline, so "a\n" would pass
    ^[a-z]$. Every `$` outside a character class becomes \Z.
    """
    out, escaped, in_class = [], False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            char = "\\Z"
        out.append(char)
    return re.compile("".join(out))


def _ecma_pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


ITEM_SCHEMA = item_schema()
ItemValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                             {"pattern": _ecma_pattern})
ItemValidator.check_schema(ITEM_SCHEMA)


def compile_schema(schema):
    """One validator per schema, built once and reused for every item."""
    return ItemValidator(schema)


_FAST_KEYWORDS = {
    "object": {"$schema", "title", "description", "type", "properties", "required",
               "dependentRequired"},
    "string": {"description", "type", "minLength", "maxLength", "pattern", "default"},
    "number": {"description", "type", "minimum", "exclusiveMinimum", "maximum", "default"},
    "integer": {"description", "type", "minimum", "maximum", "default"},
}


def compile_fast_check(schema):
    """A quick test that an item surely matches `schema`; None if the schema is beyond it.

    jsonschema walks the schema anew for every item, which was most of the cost
    of a submit. This closure is derived from the same dict and knows only the
    keywords the item schema uses; whatever it does not accept goes on to the
    validator, which has the last word and writes the message.
    """
    if schema.get("type") != "object" or set(schema) - _FAST_KEYWORDS["object"]:
        return None
    rules = {}  # property name -> what its value must be
    for name, rule in schema.get("properties", {}).items():
        kind = rule.get("type")
        if kind not in _FAST_KEYWORDS or kind == "object" or set(rule) - _FAST_KEYWORDS[kind]:
            return None
        # Exact types, since True is not a number; 1.0 is an integer to JSON Schema.
        types = {"string": (str,), "number": (int, float), "integer": (int, float)}[kind]
        integral = kind == "integer"
        low, high = ("minLength", "maxLength") if kind == "string" else ("minimum", "maximum")
        pattern = rule.get("pattern")
        rules[name] = (types, integral, rule.get(low), rule.get("exclusiveMinimum"),
                       rule.get(high), pattern and ecma_regex(pattern))
    required = frozenset(schema.get("required", ()))
    dependent = tuple((key, frozenset(needs))
                      for key, needs in schema.get("dependentRequired", {}).items())

    def check(item):
        # The item's own keys, not the schema's: most items have two of its nine.
        # (Set comparisons and plain loops: a generator here cost 10% of a check.)
        if type(item) is not dict or not item.keys() >= required:
            return False
        for name, value in item.items():
            rule = rules.get(name)
            if rule is None:
                continue  # a key the schema does not name: ignored, as by the validator
            types, integral, low, above, high, pattern = rule
            if type(value) not in types or (pattern and not pattern.search(value)) or (
                    integral and type(value) is float and not value.is_integer()):
                return False
            size = len(value) if types == (str,) else value
            if (low is not None and size < low) or (high is not None and size > high) or (
                    above is not None and size <= above):
                return False
        for key, needs in dependent:
            if key in item and not item.keys() >= needs:
                return False
        return True

    return check


def check_item(entry, validator, fast_check=None):
    """(the item string to echo or None, the error or None) for one batch entry."""
    text = entry.get("item") if isinstance(entry, dict) else None
    if not isinstance(text, str):
        text = None
    elif not _is_unicode(text):
        return None, "'item' is not valid Unicode (it holds a lone surrogate)"
    if fast_check is not None and fast_check(entry):
        return text, None
    error = jsonschema.exceptions.best_match(validator.iter_errors(entry))
    return text, None if error is None else error.message


def _is_unicode(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- Errors ------------------------------------------------------------------

class ApiError(Exception):
    """A failure the client should see: rendered as {"message": ..., "error": ...}."""

    def __init__(self, status, error, message, headers=()):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = list(headers)


class QueueFull(Exception):
    """The store refused a batch that would push queued jobs over the limit."""


class StoreError(Exception):
    """The job store cannot be used: unreachable, unwritable, closed or too new.

    Every driver error reaches the code above the stores as this, with any
    password taken out of its message.
    """


# -- Schedules ---------------------------------------------------------------
# When a recurring job's slots fall: five-field cron in a time zone, or every S
# seconds since the Unix epoch. Cron is written here, not taken from a library:
# cronsim and croniter both run a local time skipped by a clock change at the
# change and a repeated hour's `*` slots twice, where SPEC wants neither; the
# tests check this code against cronsim wherever no clock changes.

MAX_EVERY = 31_536_000  # a year: the longest `every`
CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
               ("day of week", 0, 7))
CRON_NAMES = (None, None, None,
              {name: n for n, name in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul",
                                                 "aug", "sep", "oct", "nov", "dec"), 1)},
              {name: n for n, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri",
                                                 "sat"))})
CRON_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
               "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
               "@annually": "0 0 1 1 *"}
CRON_HORIZON = 366 * 9  # days searched for the next match: Feb 29 comes within 8 years
SCHEDULE_KEYS = ("cron", "every", "job", "timezone", "paused")


class Cron:
    """A five-field cron expression (or a macro such as @daily); ValueError if bad."""

    def __init__(self, expression):
        fields = CRON_MACROS.get(expression.strip().lower(), expression).split()
        if len(fields) != 5:
            raise ValueError(f"cron {expression!r} needs five fields (minute hour day month"
                             " weekday) or one of " + ", ".join(CRON_MACROS))
        sets = [_cron_field(text, *CRON_FIELDS[n], CRON_NAMES[n]) for n, text in enumerate(fields)]
        self.minutes, self.hours = sorted(sets[0]), sorted(sets[1])
        self.days, self.months = sets[2], sets[3]
        self.weekdays = {day % 7 for day in sets[4]}  # 7 is Sunday too
        # Both day fields restricted: either matching is enough (cron's own rule; a
        # field counts as restricted unless it starts with *).
        self.either = not fields[2].startswith("*") and not fields[4].startswith("*")
        if self.next_after(0.0, datetime.UTC) is None:
            raise ValueError(f"cron {expression!r} matches no date")

    def _matches(self, day):
        if day.month not in self.months:
            return False
        in_month, in_week = day.day in self.days, (day.weekday() + 1) % 7 in self.weekdays
        return (in_month or in_week) if self.either else (in_month and in_week)

    def next_after(self, after, zone):
        """The first matching time after `after` (epoch seconds) in `zone`, or None.

        A local time that a clock change skips does not match; one that happens
        twice matches once, the first time (fold 0).
        """
        start = datetime.datetime.fromtimestamp(after, zone)
        day = start.date()
        for _ in range(CRON_HORIZON):
            if self._matches(day):
                for hour in self.hours:
                    if day == start.date() and hour < start.hour:
                        continue
                    for minute in self.minutes:
                        local = datetime.datetime(day.year, day.month, day.day, hour, minute,
                                                  tzinfo=zone)
                        moment = local.timestamp()
                        if moment > after and datetime.datetime.fromtimestamp(
                                moment, zone).replace(tzinfo=None) == local.replace(tzinfo=None):
                            return moment
            day += datetime.timedelta(days=1)
        return None


def _cron_field(text, name, low, high, names):
    """The values one cron field names: lists, ranges, steps, names, *."""
    def value(part):
        number = names.get(part.lower()) if names else None
        if number is None and not part.isdigit():
            raise ValueError(f"cron's {name} field {text!r}: {part!r} is not a value")
        return int(part) if number is None else number

    values = set()
    for part in text.split(","):
        spec, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            raise ValueError(f"cron's {name} field {text!r}: the step must be a whole number"
                             " above 0")
        if spec == "*":
            first, last = low, high
        elif "-" in spec:
            first, last = (value(end) for end in spec.split("-", 1))
        else:
            first = value(spec)
            last = high if slash else first
        if not low <= first <= last <= high:
            raise ValueError(f"cron's {name} field {text!r}: values run from {low} to {high},"
                             " low to high")
        values.update(range(first, last + 1, int(step) if slash else 1))
    return values


@functools.lru_cache(maxsize=1024)
def _cron(expression):
    return Cron(expression)


@functools.lru_cache(maxsize=256)
def time_zone(name):
    """The zone an IANA name names; ValueError if this machine knows none by it."""
    if name == "UTC":
        return datetime.UTC  # needs no zone database
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {name!r} is not an IANA time zone this machine knows"
                         " (such as Europe/Berlin; without the system's zone database,"
                         " pip install tzdata)") from None


def next_slot(schedule, after):
    """The first slot of a schedule ({"cron", "every", "timezone"}) after `after`."""
    if schedule["every"] is not None:
        every = schedule["every"]
        return (math.floor(after / every) + 1) * every
    return _cron(schedule["cron"]).next_after(after, time_zone(schedule["timezone"]))


def latest_slot(schedule, since, now):
    """The latest slot from `since` (itself a slot) to `now`: a schedule that missed
    several makes one job, for this one (SPEC's catch-up rule)."""
    if schedule["every"] is not None:
        return max(since, math.floor(now / schedule["every"]) * schedule["every"])
    for window in (60, 3600, 86400, 31 * 86400, 400 * 86400, None):
        # The first slot within `window` before now, then step to the last one.
        slot = next_slot(schedule, since - 1 if window is None else max(since, now - window) - 1)
        if slot is not None and slot <= now:
            while (later := next_slot(schedule, slot)) is not None and later <= now:
                slot = later
            return slot
    return since


class InvalidSchedule(ValueError):
    """A schedule body that cannot be used; the message says why."""


def check_schedule(body, validator, fast_check=None):
    """The schedule a PUT body describes, normalised: {"cron", "every", "timezone",
    "job", "paused"}. InvalidSchedule (or a ValueError of Cron's) naming what is wrong."""
    if not isinstance(body, dict):
        raise InvalidSchedule("a schedule is a JSON object")
    unknown = sorted(set(body) - set(SCHEDULE_KEYS))
    if unknown:
        raise InvalidSchedule(f"unknown key {unknown[0]!r}; a schedule has "
                         + ", ".join(SCHEDULE_KEYS))
    cron, every = body.get("cron"), body.get("every")
    if (cron is None) == (every is None):
        raise InvalidSchedule("a schedule needs exactly one of cron and every")
    zone = body.get("timezone", "UTC" if cron is not None else None)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not (
                1 <= every <= MAX_EVERY):
            raise InvalidSchedule(f"every must be a number of seconds from 1 to {MAX_EVERY}")
        if zone is not None:
            raise InvalidSchedule("timezone is for cron schedules; every counts from the Unix epoch")
    else:
        if not isinstance(cron, str) or not _is_unicode(cron):
            raise InvalidSchedule("cron must be a string such as '0 9 * * mon-fri'")
        if not isinstance(zone, str):
            raise InvalidSchedule("timezone must be an IANA name such as 'Europe/Berlin'")
        time_zone(zone)
        _cron(cron)
    paused = body.get("paused", False)
    if not isinstance(paused, bool):
        raise InvalidSchedule("paused must be true or false")
    job = body.get("job")
    if not isinstance(job, dict):
        raise InvalidSchedule("job must be an item: {\"item\": ..., \"valor\": ...}")
    if "delay" in job:
        raise InvalidSchedule("job: delay is not an option of a scheduled job:"
                              " it starts at its slot")
    error = check_item(job, validator, fast_check)[1]
    if error is not None:
        raise InvalidSchedule(f"job: {error}")
    return {"cron": cron, "every": every, "timezone": zone, "job": job, "paused": paused}


# -- Stores ------------------------------------------------------------------

QUEUED, RUNNING, DONE, FAILED, CANCELED = "queued", "running", "done", "failed", "canceled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELED)
FINAL_STATES = frozenset((DONE, FAILED, CANCELED))
# Totals, plus "queued": a gauge kept beside them so that neither the capacity
# check nor /health counts a long queue row by row.
COUNTERS = ("submitted", "invalid", "finished_done", "finished_failed", "finished_canceled",
            "retried", "queued", "duplicate")
PURGE_BATCH = 500  # rows per purge transaction: short, so writers never wait long
JOB_FIELDS = ("token", "item", "valor", "status", "created_at", "started_at", "finished_at",
              "attempts", "owner", "lease_until", "progress", "result", "error", "queue",
              "priority", "run_at", "retries", "retried", "batch", "unique_key", "expires_at",
              "schedule", "timeout")
SCHEDULE_FIELDS = ("name", "cron", "every", "timezone", "job", "paused", "next_run_at",
                   "last_run_at", "last_job", "created_at", "updated_at")
FIRE_BATCH = 500  # schedules one transaction makes the jobs of, at most
QUEUE_FIELDS = ("name", "paused", "concurrency", "rate_limit", "rate_per")
LIMIT_POLL = 0.05  # seconds between looks at a queue held at its concurrency
# A process of the fleet: what it records of itself, and how it is listed.
PROCESS_RECORD = ("id", "host", "pid", "version", "http", "workers", "queues")
PROCESS_FIELDS = ("id", "host", "pid", "version", "started_at", "heartbeat_at", "http",
                  "workers", "busy", "queues", "alive")
HEARTBEAT = 2.0  # seconds between a process's heartbeats
ALIVE_WITHIN = 15.0  # seconds since its last heartbeat that a process counts as alive
GONE_KEPT = 3600.0  # seconds a gone process stays listed
LAST_ID = 2 ** 63 - 1  # above every job id: a listing's `before` when none is given
WORK_TIMEOUT = 30.0  # seconds the workers' claims, ends and upkeep may wait for the store


class NewJob(collections.namedtuple(
        "NewJob", "token item valor delay priority queue retries unique unique_for expires"
                  " schedule slot timeout",
        defaults=(0, 0, DEFAULT_QUEUE, 0, None, 0.0, 0.0, None, None, 0.0))):
    """A job to submit; `retries` is its limit, `delay` seconds before its first start.

    `unique` is its key (None: none), `unique_for` how many seconds a job with that
    key created earlier keeps it out whatever its state (0: only a queued or running
    one), `expires` the seconds after its first run_at it may still start (0: no
    limit); `schedule` and `slot` name the schedule slot that made it; `timeout` the
    seconds one run may take (0: the timeout setting's).
    """

    @classmethod
    def from_item(cls, item, retries=0):
        """A job with a fresh token for a valid batch item: its options, or their
        defaults (`retries` when the item sets none). Each field has one type
        whatever JSON number the item used, so a batch stores as one column each."""
        return cls(secrets.token_hex(16), item["item"], item["valor"],
                   float(item.get("delay", 0)), int(item.get("priority", 0)),
                   item.get("queue", DEFAULT_QUEUE), int(item.get("retries", retries)),
                   item.get("unique"), float(item.get("unique_for", 0)),
                   float(item.get("expires", 0)), None, None, float(item.get("timeout", 0)))


def _job(row):
    return None if row is None else dict(zip(JOB_FIELDS, row))


def _schedule(row):
    if row is None:
        return None
    schedule = dict(zip(SCHEDULE_FIELDS, row))
    schedule["job"], schedule["paused"] = json.loads(schedule["job"]), bool(schedule["paused"])
    return schedule


_unique_of, _timeout_of = operator.attrgetter("unique"), operator.attrgetter("timeout")


def _first_keys(jobs):
    """{key: unique_for} of the first job with each unique key: the ones the store
    looks up; a later job with a key is a duplicate of the first."""
    keys = {}
    if any(map(_unique_of, jobs)):  # the usual batch has none: no Python loop for it
        for job in jobs:
            key = job.unique
            if key is not None and key not in keys:
                keys[key] = job.unique_for
    return keys


def _new_jobs(jobs):
    """`jobs` as NewJob records (a caller may give plain tuples in its field order)."""
    return [job if type(job) is NewJob else NewJob(*job) for job in jobs]


def _sort_out(jobs, found):
    """(the new jobs, {position: (token, status)} of the duplicates) of `jobs`, given
    `found`: {key: (token, status)} of the jobs already in the store that keep each
    first key out."""
    new, duplicates, first = [], {}, dict(found)
    for index, job in enumerate(jobs):
        if job.unique is not None and job.unique in first:
            duplicates[index] = first[job.unique]
            continue
        if job.unique is not None:
            first[job.unique] = (job.token, QUEUED)
        new.append(job)
    return new, duplicates


def _fired(schedules, now, retries):
    """The jobs of due schedules: [(schedule, its slot, its NewJob)], for `now`."""
    fired = []
    for schedule in schedules:
        slot = latest_slot(schedule, schedule["next_run_at"], now)
        if slot > schedule["next_run_at"]:
            log.info("schedule %s missed its slots from %s: one job for the latest, %s",
                     schedule["name"], iso_time(schedule["next_run_at"]), iso_time(slot))
        job = NewJob.from_item(schedule["job"], retries)._replace(
            schedule=schedule["name"], slot=slot)
        fired.append((schedule, slot, job))
    return fired


def _retryable(rows, held):
    """The ids among (id, token, unique key) rows, oldest first, that may go back in
    the queue: not one whose key is `held` by a live job, nor a second with one key."""
    ids, taken = [], set(held)
    for job_id, _, key in rows:
        if key is None or key not in taken:
            ids.append(job_id)
            if key is not None:
                taken.add(key)
    return ids


def _next_run_at(before, schedule, now):
    """A schedule's next slot as it is put: kept when its timing did not change (a
    missed slot is still caught up after a restart that puts it again), else the
    first slot from now."""
    timing = ("cron", "every", "timezone")
    if before is not None and all(before[name] == schedule[name] for name in timing):
        return before["next_run_at"]
    return next_slot(schedule, now)


def _queue(row):
    """A queue's settings, from a row of QUEUE_FIELDS."""
    name, paused, concurrency, limit, per = row[:5]
    return {"name": name, "paused": bool(paused), "concurrency": concurrency,
            "rate": None if limit is None else {"limit": limit, "per": per}}


def _queue_views(rows, counts):
    """Queues' views, from rows of QUEUE_FIELDS and of (queue, status, jobs)."""
    jobs = {(queue, status): int(n) for queue, status, n in counts}
    return [{**_queue(row), "queued": jobs.get((row[0], QUEUED), 0),
             "running": jobs.get((row[0], RUNNING), 0)} for row in rows]


def _fleet(rows, busy):
    """The fleet's views, alive ones first: from rows of PROCESS_FIELDS without `busy`
    (`queues` as JSON), and rows of (owner, running jobs)."""
    running = {owner: int(n) for owner, n in busy}
    views = [{"id": row[0], "host": row[1], "pid": row[2], "version": row[3],
              "started_at": row[4], "heartbeat_at": row[5], "http": bool(row[6]),
              "workers": row[7], "busy": running.get(row[0], 0),
              "queues": None if row[8] is None else json.loads(row[8]), "alive": bool(row[9])}
             for row in rows]
    return sorted(views, key=lambda view: (not view["alive"], view["host"], view["pid"]))


def _process_params(process):
    """A process record (PROCESS_RECORD) as REGISTER's parameters."""
    return {**process, "queues": None if process["queues"] is None
            else json.dumps(list(process["queues"]))}


def _queue_params(name, settings):
    """A queue's settings as PUT_QUEUE's parameters."""
    rate = settings["rate"] or {}
    return {"name": name, "paused": settings["paused"], "concurrency": settings["concurrency"],
            "rate_limit": rate.get("limit"), "rate_per": rate.get("per")}


def _claim_scope(queues, limits):
    """How a claim of `queues` (None: every queue) splits, given `limits` ({name:
    settings} of the queues paused or limited): (the limited ones, claimed under
    their lock, sorted; the others, claimed as always: a list of queues, None for
    every queue, [] for none; the queues that claim of every queue skips)."""
    if not limits:
        return [], queues, None
    locked = sorted(name for name, queue in limits.items()
                    if not queue["paused"] and (queues is None or name in queues))
    if queues is None:
        return locked, None, sorted(limits)
    return locked, [queue for queue in queues if queue not in limits], None


def _limited_due(rows):
    """Seconds until a job of the limited queues may start, from their rows of
    (seconds to the first run_at, starts left by concurrency, by rate, seconds until
    the rate's window frees one): None when none is queued. A queue at its
    concurrency is looked at again every LIMIT_POLL seconds: what frees it is an
    end in any process, which wakes nobody here."""
    dues = []
    for first, by_concurrency, by_rate, frees in rows:
        if first is None:
            continue
        due = max(0.0, first)
        if by_concurrency is not None and by_concurrency <= 0:
            due = max(due, LIMIT_POLL)
        if by_rate is not None and by_rate <= 0:
            due = max(due, frees or 0.0)
        dues.append(due)
    return min(dues, default=None)


def _others_due_needed(limited_due, others):
    """Whether next_due must look at the queues without limits too: not when a
    limited one is looked at again within LIMIT_POLL anyway (that look's claim takes
    from every queue), as the others' look may scan every queued row of the
    limited queues it skips."""
    return (others is None or bool(others)) and (limited_due is None
                                                 or limited_due > LIMIT_POLL)


def _sooner(a, b):
    return b if a is None else a if b is None else min(a, b)


def _batch(batch_id, rows, job):
    """A batch from rows of (created_at, total, job fields...); None without rows."""
    if not rows:
        return None
    jobs = [job(row[2:]) for row in rows if row[2] is not None]  # LEFT JOIN: maybe none
    return {"batch": batch_id, "created_at": rows[0][0], "total": rows[0][1], "jobs": jobs}


# Objects holding locks, threads or connections that a forked child must not
# inherit: an SQLite connection must never be used (or even closed) on both
# sides of a fork, a pool's threads do not survive it, and a lock may have been
# held by a thread the child lacks.
_fork_sensitive = weakref.WeakSet()


def _reset_after_fork():
    for thing in list(_fork_sensitive):
        thing._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


class _Submit:
    """One submit waiting for a group commit: its arguments, and its outcome once a
    transaction committed or failed."""

    __slots__ = ("args", "done", "outcome")

    def __init__(self, args):
        self.args, self.outcome, self.done = args, None, threading.Event()

    def answer(self):
        kind, value = self.outcome
        if kind == "error":
            raise value
        return value


class _Group:
    """Group commit of one store's submits in this process: the submits that arrive
    while a group commits go in the next transaction together, so they share one
    disk sync (a 202 still follows the commit that holds its jobs).

    One thread at a time leads: commit(take) opens a transaction, calls take() for
    every submit waiting by then, and returns one outcome for each, ("ok", answer)
    or ("error", exception); an exception fails every one taken (none was written).
    The leader then hands the lead to the first submit that came meanwhile. The
    others wait for it, not in a convoy on the store's lock (five times the disk
    syncs, measured)."""

    def __init__(self, commit):
        self._commit = commit
        self._pid = None  # the process of the state below: a forked child starts afresh

    def submit(self, args):
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()  # guards _pending and _leading
            self._pending = []  # _Submit requests waiting for the next group
            self._leading = False  # a thread commits groups: the others wait for it
        request = _Submit(args)
        with self._lock:
            self._pending.append(request)
            lead, self._leading = not self._leading, True
        if not lead:
            request.done.wait()  # its outcome, or the lead handed to it
        if request.outcome is None:
            self._lead()
        return request.answer()

    def _lead(self):
        group = []

        def take():
            with self._lock:
                group[:], self._pending = self._pending, []
            return group
        try:
            outcomes = self._commit(take)
        except BaseException as exc:  # noqa: BLE001 - each waiter is answered with it
            if not group:  # nothing was taken (the store stayed busy): all fail alike
                take()
            outcomes = [("error", exc)] * len(group)
        for request, outcome in zip(group, outcomes, strict=True):
            request.outcome = outcome
            request.done.set()
        with self._lock:
            successor = self._pending[0] if self._pending else None
            self._leading = successor is not None
        if successor is not None:
            successor.done.set()  # with no outcome yet: it commits the next group


class Store:
    """The method set every store implements: the contract the Runner and the App use.

    Documentation only; `SQLiteStore` and `PostgresStore` follow it. Jobs come out
    as plain dicts of JOB_FIELDS, times in epoch seconds; each method is one short
    transaction, so a call either happens whole or not at all; any driver failure
    raises StoreError, after close() every call does.

    The calls a request makes (submit, get, batch, list, counts, counters, cancel,
    cancel_batch) wait for the database at most `timeout` seconds (the store_timeout
    setting): a lock held elsewhere, a stuck server or a full pool then raises
    StoreError, and nothing changed. The workers' calls may wait longer
    (WORK_TIMEOUT): an end given up would run its job again.

    A run of a job is named by its `owner` (the process that claimed it) and its
    `attempt` (the job's `attempts` once claimed). The end, retry, progress and
    lease renewal of a run count only while that run still holds the job: once
    its lease was lost and the job claimed again, even by the same owner, the old
    run's calls change nothing (fencing).
    """

    def submit(self, jobs, invalid, max_queued, batch=None, key=None):
        """Queue `jobs` (NewJob records, or tuples in its order) at once as batch
        `batch`, counting `invalid` rejected items; or nothing, raising QueueFull when
        the queued jobs would pass `max_queued`.

        A job whose unique key is held (by a queued or running job, or one created
        within its `unique_for`, or by an earlier job of this batch) is a duplicate
        and queues nothing: this is decided under a lock on the key, so across
        processes one job is queued. Returns (duplicates, earlier): {position in
        `jobs`: (token, status) of the job it duplicates}, and None.

        `key` is (idempotency key, fingerprint, response) to keep with the batch,
        `response` the text or a function of the duplicates giving it. If a batch
        already holds that key, nothing is queued and ({}, its (fingerprint,
        response)) is returned. Wakes listeners in other processes.
        """
        raise NotImplementedError

    def get(self, token):
        """The job with this token, or None."""
        raise NotImplementedError

    def batch(self, batch_id):
        """{"batch", "created_at", "total", "jobs": [rows in input order]}, or None."""
        raise NotImplementedError

    def list(self, status=None, before=None, limit=50, queue=None):
        """Up to `limit` jobs (of `status`, in `queue`), newest first, older than job
        id `before`: (jobs, the id to pass as `before` for the next page, or None)."""
        raise NotImplementedError

    def counts(self):
        """Jobs by live state: {"queued": n, "running": n}."""
        raise NotImplementedError

    def counters(self):
        """Every counter of COUNTERS: {name: value}, summed over every process."""
        raise NotImplementedError

    def next_due(self, queues=None, limits=None):
        """Seconds until a queued job (of `queues`, or any) may start: 0 if one may
        now, None if there is none. `limits` as finish_and_claim takes them: a
        paused queue has none, one at its rate's limit waits for its window."""
        raise NotImplementedError

    def finish_and_claim(self, owner, finishes, claims, lease, queues=None, limits=None):
        """End runs of `owner` and claim up to `claims` more jobs, in one transaction:
        the workers' group commit.

        `finishes` are (token, attempt, status, result, error). A claim moves the
        next ready job (of `queues`, or any: highest priority, then earliest
        run_at, then oldest) to running for `owner`, leased for `lease` seconds,
        and counts one more attempt; no job is claimed twice, across every process.
        Returns (the tokens finished, the claimed rows in claim order); a run that
        no longer holds its job (canceled, taken back) is not among the finished.

        `limits` is queue_limits() as the caller last read it: those queues are
        claimed under their limits, read again in the transaction (no claim
        anywhere takes a paused queue's job, more than its concurrency, or more
        starts within `per` seconds than its rate allows); the others as always.
        """
        raise NotImplementedError

    def retry(self, token, owner, attempt, error, delay):
        """Put the job of this run back in the queue to start again in `delay`
        seconds, keeping `error`; False when the run no longer holds it."""
        raise NotImplementedError

    def set_progress(self, token, owner, attempt, progress):
        """Record a run's progress (0 to 1); ignored once the run no longer holds it."""
        raise NotImplementedError

    def unclaim(self, owner, runs):
        """Put jobs `owner` claimed and never started ({token: attempt}) back in the
        queue as they were before the claim (the attempt is not counted): how many."""
        raise NotImplementedError

    def renew(self, owner, runs, lease):
        """Extend by `lease` seconds the leases of these runs ({token: attempt}) of
        `owner`: the set of tokens whose runs still hold their job."""
        raise NotImplementedError

    def cancel(self, token):
        """Cancel a queued or running job: (job before, job after), the same row
        twice when it was already final, None if unknown. Wakes other processes'
        listeners when it was running."""
        raise NotImplementedError

    def cancel_batch(self, batch_id):
        """Cancel the unfinished jobs of a batch: [(token, status before)], or None
        for an unknown batch."""
        raise NotImplementedError

    def retry_jobs(self, statuses=(FAILED, CANCELED), queue=None, token=None):
        """Put the jobs in `statuses` (of `queue`, or the one `token`) back in the queue
        to run now, their retries available again (retry by hand): their tokens. A job
        whose unique key a queued or running job holds stays as it is (of several
        with one key, the oldest goes back). Runs in transactions of PURGE_BATCH jobs."""
        raise NotImplementedError

    def cancel_jobs(self, statuses=(QUEUED, RUNNING), queue=None):
        """Cancel the jobs in `statuses` (of `queue`): [(token, status before)], in
        transactions of PURGE_BATCH jobs. Wakes listeners when some were running."""
        raise NotImplementedError

    def release(self, owner):
        """Put every job `owner` runs back in the queue (a shutdown): their tokens."""
        raise NotImplementedError

    def running_owners(self):
        """The owners of running jobs."""
        raise NotImplementedError

    def recover(self, max_attempts, lost_owners=()):
        """Take back running jobs whose lease ran out or whose owner is in
        `lost_owners`: each goes back to queued, or to failed once started
        `max_attempts` times. Returns [(token, new status)]."""
        raise NotImplementedError

    def purge(self, retention, batch=PURGE_BATCH):
        """Delete up to `batch` jobs finished over `retention` seconds ago, and as many
        batches as old whose jobs are all gone (with their idempotency keys): how many."""
        raise NotImplementedError

    def maintain(self):
        """Periodic upkeep (the housekeeper calls it each minute)."""
        raise NotImplementedError

    def expire(self):
        """Cancel, with the error "expired", the queued jobs never started whose
        `expires` passed (a claim never takes one): their tokens."""
        raise NotImplementedError

    def put_schedule(self, name, schedule):
        """Create or replace a schedule (as check_schedule gives it): (its row, True
        if it is new). A replacement with the same timing keeps its next slot, so a
        restart that applies the same schedules still catches up."""
        raise NotImplementedError

    def schedule(self, name):
        """The schedule's row, or None."""
        raise NotImplementedError

    def schedules(self):
        """Every schedule's row, by name."""
        raise NotImplementedError

    def delete_schedule(self, name):
        """Remove a schedule: its last row, or None if there was none."""
        raise NotImplementedError

    def next_schedule(self):
        """Seconds until the next slot of a schedule not paused (0 if one is due), or
        None without any."""
        raise NotImplementedError

    def fire_schedules(self, retries=0):
        """Make the job of each due schedule's latest slot, in one transaction: the
        tokens of the new jobs. A slot makes one job however many processes call
        this at once: the schedule's row moves to its next slot in the transaction
        that makes the job, and a unique (schedule, slot) index backs it up."""
        raise NotImplementedError

    def queues(self, name=None):
        """Every queue a job or a setting named (or the one `name`), by name: its
        settings (see _queue) with its "queued" and "running" jobs."""
        raise NotImplementedError

    def set_queue(self, name, change):
        """Change a queue's settings, creating it if need be, in one transaction:
        `change(settings before)` gives those after, or raises, and nothing changes.
        Wakes other processes' listeners."""
        raise NotImplementedError

    def queue_limits(self):
        """{name: settings} of the queues paused or limited."""
        raise NotImplementedError

    def register(self, process):
        """Record a process of the fleet (a dict of PROCESS_RECORD), started and
        heartbeating now; one of that id stopped before lives again."""
        raise NotImplementedError

    def heartbeat(self, process_id, workers):
        """Refresh a live process's heartbeat: False when it has no live record (it
        was purged, or marked stopped), so the caller registers it again."""
        raise NotImplementedError

    def unregister(self, process_id):
        """Mark a process stopped now: listed, not alive, purged an hour later."""
        raise NotImplementedError

    def processes(self):
        """The processes recorded, as dicts of PROCESS_FIELDS (times in epoch seconds,
        `queues` a list or None, `busy` its running jobs, `alive` its heartbeat within
        ALIVE_WITHIN seconds and no stop recorded)."""
        raise NotImplementedError

    def listen(self, most):
        """A Listener of other processes' submits, cancels and queue settings, which
        reports at most `most` waiting jobs at a time."""
        raise NotImplementedError

    def close(self, final=True):
        """Let go of every connection; after a final close every call raises StoreError."""
        raise NotImplementedError


class Listener:
    """Wake-ups from other processes on the same store; see `Store.listen`."""

    def wait(self, timeout):
        """Block up to `timeout` seconds: (jobs that may be waiting, a cancel or a
        change of a queue's settings seen)."""
        raise NotImplementedError

    def close(self):
        pass


class _NoListener(Listener):
    """For a store no other process can reach: nothing to hear, only the poll."""

    def wait(self, timeout):
        time.sleep(timeout)
        return 0, False


def open_store(db, workers=16, pooler="none", listen_db=None, timeout=5.0):
    """The store `db` names: a postgresql:// URL, else an SQLite path or :memory:.

    A PostgreSQL pool holds a connection for each worker thread, and a few for
    requests and housekeeping; `pooler` and `listen_db` are the settings.
    """
    if not is_postgres_url(db):
        return SQLiteStore(db, timeout=timeout)
    return PostgresStore(db, pool_size=workers + 8, pooled=pooler == "transaction",
                         listen_url=listen_db, timeout=timeout)


class SQLiteStore(Store):
    """The jobs in one SQLite file: the only code that touches sqlite3.

    One connection per process behind a lock; each public method is one short
    transaction (writes start with BEGIN IMMEDIATE). Times are this host's clock.
    Statements take named parameters; a list of queues or owners goes in as one
    JSON array (json_each), so each statement has one text.

    Unique keys and schedule slots need no lock of their own: every write holds
    the file's write lock from BEGIN IMMEDIATE, so a look-up and the insert it
    allows happen with no other process in between.
    """

    # (Shared by SCHEMA and version 4's upgrade.) Unique keys: the look-up's index
    # (no unique index of live keys, as PostgreSQL has: here the write lock decides,
    # and that index cost 2% of a job's life, measured); a schedule slot's
    # one job; expiry's queued jobs; the schedules, found by their next slot.
    UNIQUE_AND_SCHEDULES = (
        "CREATE INDEX jobs_unique_key ON jobs (unique_key, id) WHERE unique_key IS NOT NULL",
        "CREATE UNIQUE INDEX jobs_slot ON jobs (schedule, slot) WHERE schedule IS NOT NULL",
        """CREATE INDEX jobs_expires ON jobs (expires_at)
            WHERE status = 'queued' AND expires_at IS NOT NULL""",
        """CREATE TABLE schedules (
            name TEXT PRIMARY KEY,
            cron TEXT,
            every REAL,
            timezone TEXT,
            job TEXT NOT NULL,
            paused INTEGER NOT NULL DEFAULT 0,
            next_run_at REAL NOT NULL,
            last_run_at REAL,
            last_job TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL)""",
        "CREATE INDEX schedules_next ON schedules (next_run_at) WHERE NOT paused",
    )
    # (Shared by SCHEMA and version 5's upgrade.) The queues: every name a job or a
    # setting gave, with its settings; the starts of the rate-limited ones, one row
    # per claim, pruned by maintain().
    QUEUES = (
        """CREATE TABLE queues (
            name TEXT PRIMARY KEY,
            paused INTEGER NOT NULL DEFAULT 0,
            concurrency INTEGER,
            rate_limit INTEGER,
            rate_per REAL,
            updated_at REAL NOT NULL DEFAULT 0)""",
        "CREATE TABLE queue_starts (queue TEXT NOT NULL, at REAL NOT NULL, count INTEGER NOT NULL)",
        "CREATE INDEX queue_starts_queue_at ON queue_starts (queue, at)",
    )
    # (Shared by SCHEMA and version 6's upgrade.) The fleet: one row per process.
    PROCESSES = (
        """CREATE TABLE processes (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            version TEXT NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            stopped_at REAL,
            http INTEGER NOT NULL,
            workers INTEGER NOT NULL,
            queues TEXT)""",
    )

    # -- Schema: the tables as they are now, and how an older file gets there.
    VERSION = 6  # PRAGMA user_version; 0.1.0 recorded none, its layout is version 1
    SCHEMA = (
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            token TEXT NOT NULL UNIQUE,
            item TEXT NOT NULL,
            valor,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            lease_until REAL,
            progress REAL,
            result TEXT,
            error TEXT,
            queue TEXT NOT NULL DEFAULT 'default',
            priority INTEGER NOT NULL DEFAULT 0,
            run_at REAL,
            retries INTEGER NOT NULL DEFAULT 0,
            retried INTEGER NOT NULL DEFAULT 0,
            batch TEXT,
            unique_key TEXT,
            expires_at REAL,
            schedule TEXT,
            slot REAL,
            timeout REAL)""",
        "CREATE INDEX jobs_status_id ON jobs (status, id)",
        "CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL",
        # The claim's order over only the queued rows, and their next start.
        "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, id) WHERE status = 'queued'",
        "CREATE INDEX jobs_due ON jobs (run_at) WHERE status = 'queued'",
        "CREATE INDEX jobs_batch ON jobs (batch, id) WHERE batch IS NOT NULL",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        # Batches, and the idempotency keys and first answers of their submits.
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            total INTEGER NOT NULL,
            idempotency_key TEXT UNIQUE,
            fingerprint TEXT,
            response TEXT)""",
        "CREATE INDEX batches_created_at ON batches (created_at)",
        *UNIQUE_AND_SCHEDULES,
        *QUEUES,
        *PROCESSES,
    )
    # (v, statements): what takes a version v-1 file to version v, in order; the
    # result is SCHEMA, which a test checks.
    UPGRADES = (
        (2, ("ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default'",
             "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
             "ALTER TABLE jobs ADD COLUMN run_at REAL",
             "UPDATE jobs SET run_at = created_at",
             "ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0",
             "ALTER TABLE jobs ADD COLUMN retried INTEGER NOT NULL DEFAULT 0",
             "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, id) WHERE status = 'queued'",
             "CREATE INDEX jobs_due ON jobs (run_at) WHERE status = 'queued'")),
        (3, ("""CREATE TABLE batches (id TEXT PRIMARY KEY, created_at REAL NOT NULL,
                 total INTEGER NOT NULL, idempotency_key TEXT UNIQUE, fingerprint TEXT,
                 response TEXT)""",
             "CREATE INDEX batches_created_at ON batches (created_at)",
             "ALTER TABLE jobs ADD COLUMN batch TEXT",
             "CREATE INDEX jobs_batch ON jobs (batch, id) WHERE batch IS NOT NULL")),
        (4, ("ALTER TABLE jobs ADD COLUMN unique_key TEXT",
             "ALTER TABLE jobs ADD COLUMN expires_at REAL",
             "ALTER TABLE jobs ADD COLUMN schedule TEXT",
             "ALTER TABLE jobs ADD COLUMN slot REAL",
             *UNIQUE_AND_SCHEDULES)),
        (5, ("ALTER TABLE jobs ADD COLUMN timeout REAL", *QUEUES,
             "INSERT INTO queues (name) SELECT DISTINCT queue FROM jobs")),
        (6, PROCESSES),
    )
    SCHEMA_VERSION = "PRAGMA user_version"
    SET_SCHEMA_VERSION = f"PRAGMA user_version = {VERSION}"
    HAS_JOBS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
    ADD_COUNTER = "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)"
    RECOUNT_QUEUED = """UPDATE counters SET value = (SELECT COUNT(*) FROM jobs WHERE status = 'queued')
        WHERE name = 'queued'"""
    # FULL: a 202 means the batch survives a power cut, not just a crash. NORMAL for
    # the workers' claims and ends: one lost to a power cut only runs a job again.
    DURABLE, NOT_DURABLE = "PRAGMA synchronous=FULL", "PRAGMA synchronous=NORMAL"

    # -- Submitting; a group of submits gives each a savepoint.
    SAVEPOINT, RELEASE_SAVEPOINT = "SAVEPOINT submit", "RELEASE submit"
    ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO submit"
    BATCH_OF_KEY = "SELECT fingerprint, response FROM batches WHERE idempotency_key = ?"
    QUEUED_GAUGE = "SELECT value FROM counters WHERE name = 'queued'"
    INSERT_BATCH = """INSERT INTO batches (id, created_at, total, idempotency_key, fingerprint,
            response)
        VALUES (?, ?, ?, ?, ?, ?)"""
    INSERT_JOB = """INSERT INTO jobs (token, item, valor, status, created_at, run_at, queue,
            priority, retries, batch, unique_key, expires_at)
        VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"""
    # A batch with a timeout: a statement of its own, as a column bound NULL in every
    # other one cost 6% of a submit (measured).
    INSERT_TIMED_JOB = """INSERT INTO jobs (token, item, valor, status, created_at, run_at,
            queue, priority, retries, batch, unique_key, expires_at, timeout)
        VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
    # A schedule slot's job: its own statement, so that a submit pays for neither the
    # two columns nor the conflict check (measured: 40% of a job's insert).
    INSERT_SCHEDULED_JOB = """INSERT INTO jobs (token, item, valor, status, created_at, run_at,
            queue, priority, retries, unique_key, expires_at, schedule, slot, timeout)
        VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (schedule, slot) WHERE schedule IS NOT NULL DO NOTHING"""
    ADD_TO_COUNTER = "UPDATE counters SET value = value + ? WHERE name = ?"
    NAME_QUEUE = "INSERT OR IGNORE INTO queues (name) VALUES (?)"
    # The jobs that may keep a batch's keys out, in one statement for all of them
    # (:keys is [[key, since], ...], since NULL for no unique_for): live ones, and
    # those created since; the method keeps a live one first, else the newest.
    DUPLICATES_OF = """SELECT json_extract(k.value, '$[0]'), j.token, j.status,
            j.status IN ('queued', 'running'), j.id
        FROM json_each(:keys) AS k
        JOIN jobs AS j INDEXED BY jobs_unique_key ON j.unique_key = json_extract(k.value, '$[0]')
        WHERE j.status IN ('queued', 'running') OR j.created_at >= json_extract(k.value, '$[1]')"""

    # -- Reading jobs and batches.
    COLUMNS = ", ".join(JOB_FIELDS)
    GET_JOB = f"SELECT {COLUMNS} FROM jobs WHERE token = ?"
    GET_BATCH = f"""SELECT b.created_at, b.total, j.*
        FROM batches AS b LEFT JOIN (SELECT {COLUMNS}, id AS id FROM jobs) AS j ON j.batch = b.id
        WHERE b.id = ? ORDER BY j.id"""
    LIST = f"""SELECT {COLUMNS}, id FROM jobs
        WHERE id < :before AND (:queue IS NULL OR queue = :queue)
        ORDER BY id DESC LIMIT :limit"""
    LIST_BY_STATUS = f"""SELECT {COLUMNS}, id FROM jobs
        WHERE status = :status AND id < :before AND (:queue IS NULL OR queue = :queue)
        ORDER BY id DESC LIMIT :limit"""
    COUNTS = """SELECT (SELECT value FROM counters WHERE name = 'queued'),
        (SELECT COUNT(*) FROM jobs WHERE status = 'running')"""
    COUNTER_VALUES = "SELECT name, value FROM counters"

    # -- Claiming and ending runs. INDEXED BY: without statistics SQLite would take
    # the (status, id) index and sort every queued row for each claim. A claim of
    # queues without limits is CLAIM (of `queues`, or every queue); with some
    # limited, CLAIM_EXCEPT skips those, and each limited queue not paused is
    # claimed by CLAIM_QUEUE, up to its QUEUE_ROOM, in the same transaction: the
    # write lock makes it the only claim anywhere, so none can overshoot.
    IN_QUEUES = "(:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))"
    NOT_SKIPPED = "queue NOT IN (SELECT value FROM json_each(:skip))"
    ANY_READY = f"""SELECT 1 FROM jobs INDEXED BY jobs_ready
        WHERE status = 'queued' AND run_at <= :now
          AND (expires_at IS NULL OR expires_at > :now OR attempts > 0) AND {IN_QUEUES}
        LIMIT 1"""
    NEXT_DUE_OF = "SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due WHERE status = 'queued' AND {}"
    NEXT_DUE, NEXT_DUE_EXCEPT = NEXT_DUE_OF.format(IN_QUEUES), NEXT_DUE_OF.format(NOT_SKIPPED)
    CLAIM_OF = f"""UPDATE jobs SET status = 'running', owner = :owner,
            lease_until = :now + :lease, started_at = :now, attempts = attempts + 1,
            progress = NULL
        WHERE id IN (
            SELECT id FROM jobs INDEXED BY jobs_ready
            WHERE status = 'queued' AND run_at <= :now
              AND (expires_at IS NULL OR expires_at > :now OR attempts > 0) AND {{}}
            ORDER BY priority DESC, run_at, id LIMIT :limit)
        RETURNING {COLUMNS}"""
    CLAIM, CLAIM_EXCEPT = CLAIM_OF.format(IN_QUEUES), CLAIM_OF.format(NOT_SKIPPED)
    CLAIM_QUEUE = CLAIM_OF.format("queue = :queue")
    # Whether any queue is not skipped: CLAIM_EXCEPT walks past every ready job of the
    # skipped queues, for nothing when they are the only ones.
    ANY_OTHER_QUEUE = "SELECT 1 FROM queues WHERE name NOT IN (SELECT value FROM json_each(:skip))"
    # A limited queue's starts left, by its concurrency and by its rate (NULL: no
    # such limit): its running jobs (few: the index's running rows), and the starts
    # in its window.
    RUNNING_OF = """(SELECT COUNT(*) FROM jobs INDEXED BY jobs_status_id
        WHERE status = 'running' AND queue = q.name)"""
    STARTS_OF = """(SELECT {} FROM queue_starts
        WHERE queue = q.name AND at > :now - q.rate_per)"""
    LIMITED = "FROM queues AS q WHERE name IN (SELECT value FROM json_each(:names)) AND NOT paused"
    QUEUE_ROOM = f"""SELECT name, rate_limit IS NOT NULL, concurrency - {RUNNING_OF},
            rate_limit - {STARTS_OF.format("COALESCE(SUM(count), 0)")}
        {LIMITED} ORDER BY name"""
    ADD_STARTS = "INSERT INTO queue_starts (queue, at, count) VALUES (?, ?, ?)"
    # Their rows for _limited_due.
    LIMITED_DUE = f"""SELECT (SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due
                WHERE status = 'queued' AND queue = q.name) - :now,
            concurrency - {RUNNING_OF},
            rate_limit - {STARTS_OF.format("COALESCE(SUM(count), 0)")},
            {STARTS_OF.format("MIN(at)")} + rate_per - :now
        {LIMITED}"""
    # Positional, unlike the rest: it runs once per job, where named parameters cost
    # about 30% more to bind (5% of a group commit, measured).
    FINISH = """UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ?,
            lease_until = NULL
        WHERE token = ? AND owner = ? AND attempts = ? AND status = 'running'"""
    RETRY = """UPDATE jobs SET status = 'queued', lease_until = NULL,
            progress = NULL, error = :error, run_at = :now + :delay, retried = retried + 1
        WHERE token = :token AND owner = :owner AND attempts = :attempt AND status = 'running'"""
    SET_PROGRESS = """UPDATE jobs SET progress = :progress
        WHERE token = :token AND owner = :owner AND attempts = :attempt AND status = 'running'"""
    RENEW = """UPDATE jobs SET lease_until = :now + :lease
        WHERE token = :token AND owner = :owner AND attempts = :attempt AND status = 'running'
        RETURNING token"""
    UNCLAIM = """UPDATE jobs SET status = 'queued', owner = NULL, started_at = NULL,
            lease_until = NULL, attempts = attempts - 1
        WHERE token = ? AND owner = ? AND attempts = ? AND status = 'running'"""

    # -- Canceling.
    CANCEL = f"""UPDATE jobs SET status = 'canceled', finished_at = ?, lease_until = NULL
        WHERE token = ? RETURNING {COLUMNS}"""
    BATCH_EXISTS = "SELECT 1 FROM batches WHERE id = ?"
    UNFINISHED_OF_BATCH = """SELECT token, status FROM jobs
        WHERE batch = ? AND status IN ('queued', 'running')"""
    CANCEL_BATCH = """UPDATE jobs SET status = 'canceled', finished_at = ?, lease_until = NULL
        WHERE batch = ? AND status IN ('queued', 'running')"""

    # -- Retrying and canceling by hand, PURGE_BATCH jobs a transaction.
    RETRY_CANDIDATES = """SELECT id, token, unique_key FROM jobs
        WHERE status IN (SELECT value FROM json_each(:statuses))
          AND (:queue IS NULL OR queue = :queue) AND id > :after
        ORDER BY id LIMIT :limit"""
    RETRY_CANDIDATE = """SELECT id, token, unique_key FROM jobs
        WHERE token = :token AND status IN (SELECT value FROM json_each(:statuses))"""
    LIVE_KEYS = """SELECT DISTINCT unique_key FROM jobs INDEXED BY jobs_unique_key
        WHERE unique_key IN (SELECT value FROM json_each(:keys))
          AND status IN ('queued', 'running')"""
    REQUEUE = """UPDATE jobs SET status = 'queued', run_at = :now, finished_at = NULL,
            lease_until = NULL, progress = NULL, retried = 0, expires_at = NULL
        WHERE id IN (SELECT value FROM json_each(:ids)) RETURNING token"""
    CANCEL_CANDIDATES = """SELECT id, token, status FROM jobs
        WHERE status IN (SELECT value FROM json_each(:statuses))
          AND (:queue IS NULL OR queue = :queue)
        ORDER BY id LIMIT :limit"""
    CANCEL_IDS = """UPDATE jobs SET status = 'canceled', finished_at = :now, lease_until = NULL
        WHERE id IN (SELECT value FROM json_each(:ids))"""

    # -- Taking jobs back: a shutdown, lost leases, dead owners.
    RELEASE = """UPDATE jobs SET status = 'queued', lease_until = NULL,
            progress = NULL
        WHERE owner = ? AND status = 'running' RETURNING token"""
    RUNNING_OWNERS = """SELECT DISTINCT owner FROM jobs
        WHERE status = 'running' AND owner IS NOT NULL"""
    ANY_LOST = """SELECT 1 FROM jobs
        WHERE status = 'running'
          AND (lease_until < :now OR owner IN (SELECT value FROM json_each(:lost)))
        LIMIT 1"""
    RECOVER = """UPDATE jobs SET
            status = CASE WHEN attempts >= :most THEN 'failed' ELSE 'queued' END,
            finished_at = CASE WHEN attempts >= :most THEN :now END,
            error = CASE WHEN attempts >= :most THEN 'worker lost after ' || attempts || ' attempts'
                    ELSE error END,
            lease_until = NULL, progress = NULL
        WHERE status = 'running'
          AND (lease_until < :now OR owner IN (SELECT value FROM json_each(:lost)))
        RETURNING token, status"""

    # -- Expiry: queued jobs never started, past their time.
    ANY_EXPIRED = """SELECT 1 FROM jobs INDEXED BY jobs_expires
        WHERE status = 'queued' AND expires_at <= :now AND attempts = 0 LIMIT 1"""
    EXPIRE = """UPDATE jobs SET status = 'canceled', finished_at = :now, error = 'expired'
        WHERE status = 'queued' AND expires_at <= :now AND attempts = 0 RETURNING token"""

    # -- Schedules.
    SCHEDULE_COLUMNS = ", ".join(SCHEDULE_FIELDS)
    GET_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?"
    LIST_SCHEDULES = f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name"
    PUT_SCHEDULE = """INSERT INTO schedules (name, cron, every, timezone, job, paused,
            next_run_at, created_at, updated_at)
        VALUES (:name, :cron, :every, :timezone, :job, :paused, :next_run_at, :now, :now)
        ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, every = excluded.every,
            timezone = excluded.timezone, job = excluded.job, paused = excluded.paused,
            next_run_at = excluded.next_run_at, updated_at = excluded.updated_at"""
    DELETE_SCHEDULE = f"DELETE FROM schedules WHERE name = ? RETURNING {SCHEDULE_COLUMNS}"
    NEXT_SCHEDULE = """SELECT MIN(next_run_at) FROM schedules INDEXED BY schedules_next
        WHERE NOT paused"""
    DUE_SCHEDULES = f"""SELECT {SCHEDULE_COLUMNS} FROM schedules INDEXED BY schedules_next
        WHERE NOT paused AND next_run_at <= :now ORDER BY next_run_at LIMIT :limit"""
    SCHEDULE_FIRED = """UPDATE schedules SET next_run_at = ?, last_run_at = ?, last_job = ?
        WHERE name = ?"""

    # -- Queues: their settings, and their jobs by live state.
    QUEUE_COLUMNS = ", ".join(QUEUE_FIELDS)
    GET_QUEUE = f"SELECT {QUEUE_COLUMNS} FROM queues WHERE name = ?"
    LIST_QUEUES = f"""SELECT {QUEUE_COLUMNS} FROM queues WHERE :name IS NULL OR name = :name
        ORDER BY name"""
    QUEUE_COUNTS = """SELECT queue, status, COUNT(*) FROM jobs INDEXED BY jobs_status_id
        WHERE status IN ('queued', 'running') AND (:name IS NULL OR queue = :name)
        GROUP BY queue, status"""
    QUEUE_LIMITS = f"""SELECT {QUEUE_COLUMNS} FROM queues
        WHERE paused OR concurrency IS NOT NULL OR rate_limit IS NOT NULL"""
    PUT_QUEUE = """INSERT INTO queues (name, paused, concurrency, rate_limit, rate_per, updated_at)
        VALUES (:name, :paused, :concurrency, :rate_limit, :rate_per, :now)
        ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,
            concurrency = excluded.concurrency, rate_limit = excluded.rate_limit,
            rate_per = excluded.rate_per, updated_at = excluded.updated_at"""
    # The starts that no window counts any more.
    PRUNE_STARTS = """DELETE FROM queue_starts WHERE at <= ? - COALESCE((SELECT rate_per
        FROM queues WHERE name = queue_starts.queue AND rate_limit IS NOT NULL), 0)"""

    # -- The fleet. A process's busy count is its running jobs, read when listed: the
    # heartbeat is one row's update, whatever the jobs.
    REGISTER = """INSERT INTO processes (id, host, pid, version, started_at, heartbeat_at, http,
            workers, queues)
        VALUES (:id, :host, :pid, :version, :now, :now, :http, :workers, :queues)
        ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, stopped_at = NULL,
            http = excluded.http, workers = excluded.workers, queues = excluded.queues"""
    HEARTBEAT = """UPDATE processes SET heartbeat_at = ?, workers = ?
        WHERE id = ? AND stopped_at IS NULL"""
    UNREGISTER = "UPDATE processes SET heartbeat_at = ?, stopped_at = ? WHERE id = ?"
    LIST_PROCESSES = """SELECT id, host, pid, version, started_at, heartbeat_at, http, workers,
            queues, stopped_at IS NULL AND heartbeat_at > :now - :alive
        FROM processes"""
    BUSY = """SELECT owner, COUNT(*) FROM jobs INDEXED BY jobs_status_id
        WHERE status = 'running' GROUP BY owner"""
    PURGE_PROCESSES = "DELETE FROM processes WHERE heartbeat_at < ?"

    # -- Retention.
    PURGE_JOBS = """DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs WHERE finished_at < ? LIMIT ?)"""
    PURGE_BATCHES = """DELETE FROM batches WHERE id IN (
        SELECT id FROM batches AS b
        WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM jobs WHERE batch = b.id)
        LIMIT ?)"""

    # -- The listener: commits by other connections, and what they changed.
    DATA_VERSION = "PRAGMA data_version"
    READY_COUNT = """SELECT COUNT(*) FROM (
        SELECT 1 FROM jobs INDEXED BY jobs_due WHERE status = 'queued' AND run_at <= ? LIMIT ?)"""
    # A cancel, or a queue's settings changed: the runner looks at both.
    CHANGES = """SELECT (SELECT value FROM counters WHERE name = 'finished_canceled'),
        (SELECT MAX(updated_at) FROM queues)"""

    listen_interval = 0.005  # seconds between looks at PRAGMA data_version

    def __init__(self, path, timeout=5.0):
        self.path, self.timeout = os.fspath(path), timeout
        self._named = frozenset()  # queues whose rows this process saw committed
        self._after_fork()
        self._closed = False
        try:
            with self._transaction() as conn:
                self._migrate(conn)
        except StoreError as exc:
            self.close()
            raise StoreError(f"cannot use database {self.path!r}: {exc}") from None
        if self.path != ":memory:":
            # Reopened on first use in each process, so a pre-forking host
            # never shares this connection with its children.
            self.close(final=False)
        _fork_sensitive.add(self)

    def _migrate(self, conn):
        (version,) = conn.execute(self.SCHEMA_VERSION).fetchone()
        if version == 0 and conn.execute(self.HAS_JOBS).fetchone():
            version = 1  # a 0.1.0 database
        if version > self.VERSION:
            raise StoreError(f"its schema version {version} is newer than this queue_tool"
                             f" {__version__} knows ({self.VERSION}); upgrade queue_tool")
        for statement in self.SCHEMA if version == 0 else ():
            conn.execute(statement)
        for step, statements in self.UPGRADES if version else ():
            for statement in statements if step > version else ():
                conn.execute(statement)
        conn.execute(self.SET_SCHEMA_VERSION)
        conn.executemany(self.ADD_COUNTER, [(name,) for name in COUNTERS])
        conn.execute(self.RECOUNT_QUEUED)

    def _connection(self, reading=False):
        """This process's connection for writes, or (`reading`) for reads."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._pid != os.getpid():
            self._conns, self._pid = {}, os.getpid()
        role = "read" if reading and self.path != ":memory:" else "write"
        conn = self._conns.get(role)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=WORK_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(self.DURABLE)
            if role == "write":
                self._durable, self._busy_ms = True, int(WORK_TIMEOUT * 1000)
            self._conns[role] = conn
        return conn

    def _after_fork(self):
        # One connection for writes and one for reads, each behind its own lock, so
        # that a read never waits behind a write that waits for another process (in
        # WAL mode a read needs no lock on the file). A :memory: database is one per
        # connection: there, reads take the writer's.
        self._lock = threading.Lock()  # guards the write connection, _durable, _busy_ms
        self._group = _Group(self._commit_group)
        self._read_lock = self._lock if self.path == ":memory:" else threading.Lock()
        self._conns, self._pid = {}, None  # "write"/"read" -> connection, of process _pid

    def close(self, final=True):
        with self._lock, contextlib.ExitStack() as held:
            if self._read_lock is not self._lock:
                held.enter_context(self._read_lock)
            for conn in self._conns.values() if self._pid == os.getpid() else ():
                conn.close()  # the parent's are dropped unclosed on purpose
            self._conns, self._closed = {}, final

    @contextlib.contextmanager
    def _locked(self, timeout):
        """The connection for writes, this process's turn on it taken within `timeout`
        seconds; and the seconds left. (_read does the same for reads, inline.)"""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise StoreError(f"the store stayed busy for {timeout:g}s")
        try:
            yield self._connection(), deadline - time.monotonic()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _transaction(self, durable=True, timeout=WORK_TIMEOUT):
        """One write transaction within `timeout` seconds: BEGIN IMMEDIATE, then
        COMMIT, or ROLLBACK on error. `durable=False` commits without waiting for
        the disk."""
        with self._locked(timeout) as (conn, left), self._begun(conn, left, durable):
            yield conn

    @contextlib.contextmanager
    def _begun(self, conn, left, durable):
        """A write transaction on the writer `conn` (its lock held), `left` seconds to go."""
        # Another connection's write lock is waited for at most the time left (in
        # steps of 0.1 s, so that a worker's transactions rarely change it).
        busy_ms = max(1, int(left * 10)) * 100
        if busy_ms != self._busy_ms:
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._busy_ms = busy_ms
        if durable != self._durable:
            conn.execute(self.DURABLE if durable else self.NOT_DURABLE)
            self._durable = durable
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _read(self, sql, params=(), on_writer=False):
        """Rows of one query, within the store's timeout, on the connection for reads
        (or the writer's); a single statement needs no explicit transaction. (The
        hot path of every check: _locked's steps, without a context manager.)"""
        lock = self._lock if on_writer else self._read_lock
        if not lock.acquire(timeout=self.timeout):
            raise StoreError(f"the store stayed busy for {self.timeout:g}s")
        try:
            return self._connection(not on_writer).execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        finally:
            lock.release()

    @staticmethod
    def _json_list(values):
        """A list of queues or owners as one parameter (json_each reads it); None if empty."""
        return json.dumps(list(values)) if values else None

    def _count(self, conn, **deltas):
        conn.executemany(self.ADD_TO_COUNTER, [(n, name) for name, n in deltas.items() if n])

    # Each method below is one transaction.

    def submit(self, jobs, invalid, max_queued, batch=None, key=None):
        """Group commit: the submits that wait for this process's writer while another
        commits go in the next transaction together, each in a savepoint of its own,
        so they share one fsync (a 202 still follows the commit that holds its jobs)."""
        return self._group.submit((_new_jobs(jobs), invalid, max_queued, batch, key))

    def _commit_group(self, take):
        """The group commit's transaction (see _Group): the submits waiting once this
        process's writer is free, each in a savepoint of its own."""
        named = set()
        with self._locked(self.timeout) as (conn, left):
            group = take()
            with self._begun(conn, left, durable=True):
                outcomes = [self._submit_in(conn, request, len(group) > 1, named)
                            for request in group]
        self._named = self._named | named  # replaced whole: other threads read it
        return outcomes

    def _submit_in(self, conn, request, several, named):
        """One submit of a group: ("ok", its answer) or ("error", QueueFull), the
        latter rolled back to its savepoint (alone, it rolls the transaction back)."""
        if several:
            conn.execute(self.SAVEPOINT)
        try:
            answer = self._submit(conn, *request.args, named)
        except QueueFull as exc:
            if not several:
                raise
            conn.execute(self.ROLLBACK_TO_SAVEPOINT)
            conn.execute(self.RELEASE_SAVEPOINT)
            return "error", exc
        if several:
            conn.execute(self.RELEASE_SAVEPOINT)
        return "ok", answer

    def _submit(self, conn, jobs, invalid, max_queued, batch, key, named):
        if key is not None:
            earlier = conn.execute(self.BATCH_OF_KEY, (key[0],)).fetchone()
            if earlier is not None:
                return {}, tuple(earlier)
        now = time.time()
        jobs, duplicates = self._sort_out(conn, jobs, now)
        if jobs:
            (queued,) = conn.execute(self.QUEUED_GAUGE).fetchone()
            if queued + len(jobs) > max_queued:
                raise QueueFull(f"{queued} jobs are queued; the limit is {max_queued}")
        if batch is not None:
            response = key and (key[2](duplicates) if callable(key[2]) else key[2])
            conn.execute(self.INSERT_BATCH, (batch, now, len(jobs),
                                             *(key[:2] if key else (None, None)), response))
        named |= self._insert(conn, jobs, now, batch)
        self._count(conn, submitted=len(jobs), invalid=invalid, queued=len(jobs),
                    duplicate=len(duplicates))
        return duplicates, None

    def _sort_out(self, conn, jobs, now):
        """(the new jobs, the duplicates) of `jobs`: see Store.submit."""
        keys = _first_keys(jobs)
        if not keys:
            return jobs, {}
        best = {}  # key -> (live, id, token, status) of the job that keeps it out
        for key, token, status, live, job_id in conn.execute(self.DUPLICATES_OF, {
                "keys": json.dumps([[key, now - unique_for if unique_for else None]
                                    for key, unique_for in keys.items()])}):
            best[key] = max(best.get(key, (0, 0)), (live, job_id, token, status))
        return _sort_out(jobs, {key: found[2:] for key, found in best.items()})

    def _insert(self, conn, jobs, now, batch=None):
        """Insert the jobs: the queue names newly given (see _name_queues)."""
        named = self._name_queues(conn, jobs)
        rows = [(job.token, job.item, job.valor, now, now + job.delay, job.queue, job.priority,
                 job.retries, batch, job.unique,
                 now + job.delay + job.expires if job.expires else None) for job in jobs]
        timed = any(map(_timeout_of, jobs))  # only such a batch pays for the column
        if timed:
            rows = [(*row, job.timeout or None) for row, job in zip(rows, jobs)]
        conn.executemany(self.INSERT_TIMED_JOB if timed else self.INSERT_JOB, rows)
        return named

    def _name_queues(self, conn, jobs):
        """Give the jobs' queues their rows: the names given, to add to _named once
        committed. A queue's row is never deleted, so the names this process saw
        committed need no statement (it cost 2% of a submit, measured)."""
        names = {job.queue for job in jobs} - self._named
        if names:
            conn.executemany(self.NAME_QUEUE, [(name,) for name in names])
        return names

    def get(self, token):
        return _job(next(iter(self._read(self.GET_JOB, (token,))), None))

    def batch(self, batch_id):
        return _batch(batch_id, self._read(self.GET_BATCH, (batch_id,)), _job)

    def list(self, status=None, before=None, limit=50, queue=None):
        rows = self._read(self.LIST if status is None else self.LIST_BY_STATUS, {
            "status": status, "queue": queue, "limit": limit + 1,
            "before": LAST_ID if before is None else before})
        next_before = rows[limit - 1][-1] if len(rows) > limit else None
        return [_job(row) for row in rows[:limit]], next_before

    def counts(self):
        ((queued, running),) = self._read(self.COUNTS)
        return {QUEUED: queued, RUNNING: running}

    def counters(self):
        return dict(self._read(self.COUNTER_VALUES))

    def next_due(self, queues=None, limits=None):
        locked, others, skip = _claim_scope(queues, limits)
        now = time.time()
        due = _limited_due(self._read(self.LIMITED_DUE, {
            "names": json.dumps(locked), "now": now})) if locked else None
        if _others_due_needed(due, others):
            ((run_at,),) = self._read(*(
                (self.NEXT_DUE_EXCEPT, {"skip": json.dumps(skip)}) if skip else
                (self.NEXT_DUE, {"queues": self._json_list(others)})))
            due = _sooner(due, None if run_at is None else max(0.0, run_at - now))
        return due

    def finish_and_claim(self, owner, finishes, claims, lease, queues=None, limits=None):
        if not finishes and (not claims or not self._read(
                self.ANY_READY, {"now": time.time(), "queues": self._json_list(queues)})):
            return set(), []  # a read takes no write lock
        finished, counts = set(), collections.Counter()
        with self._transaction(durable=False) as conn:
            now = time.time()
            for token, attempt, status, result, error in finishes:
                if conn.execute(self.FINISH, (status, now, result, error, token, owner,
                                              attempt)).rowcount:
                    finished.add(token)
                    counts["finished_" + status] += 1
            claimed = self._claim(conn, {"owner": owner, "now": now, "lease": lease},
                                  claims, *_claim_scope(queues, limits)) if claims else []
            self._count(conn, queued=-len(claimed), **counts)
        claimed = [_job(row) for row in claimed]  # RETURNING has no order of its own
        claimed.sort(key=lambda job: (-job["priority"], job["run_at"], job["created_at"]))
        return finished, claimed

    def _claim(self, conn, params, claims, locked, others, skip):
        """Up to `claims` rows claimed: of the limited queues first, each up to its
        room, recording a rate-limited queue's starts; then of the others."""
        claimed = []
        for name, rated, *rooms in conn.execute(self.QUEUE_ROOM, {
                "names": json.dumps(locked), "now": params["now"]}).fetchall() if locked else ():
            room = min([claims - len(claimed), *(n for n in rooms if n is not None)])
            if room > 0:
                rows = conn.execute(self.CLAIM_QUEUE, {**params, "queue": name,
                                                       "limit": room}).fetchall()
                if rated and rows:
                    conn.execute(self.ADD_STARTS, (name, params["now"], len(rows)))
                claimed += rows
        if len(claimed) < claims and (others is None or others) and (
                not skip or conn.execute(self.ANY_OTHER_QUEUE, {"skip": json.dumps(skip)})
                .fetchone()):
            which = {"skip": json.dumps(skip)} if skip else {"queues": self._json_list(others)}
            claimed += conn.execute(self.CLAIM_EXCEPT if skip else self.CLAIM, {
                **params, **which, "limit": claims - len(claimed)}).fetchall()
        return claimed

    def retry(self, token, owner, attempt, error, delay):
        with self._transaction() as conn:
            changed = conn.execute(self.RETRY, {
                "error": error, "now": time.time(), "delay": delay, "token": token,
                "owner": owner, "attempt": attempt}).rowcount
            self._count(conn, queued=changed, retried=changed)
        return bool(changed)

    def set_progress(self, token, owner, attempt, progress):
        with self._transaction() as conn:
            conn.execute(self.SET_PROGRESS, {"progress": progress, "token": token,
                                             "owner": owner, "attempt": attempt})

    def unclaim(self, owner, runs):
        with self._transaction() as conn:
            count = sum(conn.execute(self.UNCLAIM, (token, owner, attempt)).rowcount
                        for token, attempt in runs.items())
            self._count(conn, queued=count)
        return count

    def renew(self, owner, runs, lease):
        held = set()
        with self._transaction() as conn:
            now = time.time()
            for token, attempt in runs.items():
                held.update(token for (token,) in conn.execute(self.RENEW, {
                    "now": now, "lease": lease, "token": token, "owner": owner,
                    "attempt": attempt}))
        return held

    def cancel(self, token):
        with self._transaction(timeout=self.timeout) as conn:
            before = _job(conn.execute(self.GET_JOB, (token,)).fetchone())
            if before is None or before["status"] in FINAL_STATES:
                return None if before is None else (before, before)
            after = _job(conn.execute(self.CANCEL, (time.time(), token)).fetchone())
            self._count(conn, finished_canceled=1, queued=-(before["status"] == QUEUED))
        return before, after

    def cancel_batch(self, batch_id):
        with self._transaction(timeout=self.timeout) as conn:
            if conn.execute(self.BATCH_EXISTS, (batch_id,)).fetchone() is None:
                return None
            rows = conn.execute(self.UNFINISHED_OF_BATCH, (batch_id,)).fetchall()
            conn.execute(self.CANCEL_BATCH, (time.time(), batch_id))
            self._count(conn, finished_canceled=len(rows),
                        queued=-sum(status == QUEUED for _, status in rows))
        return rows

    def retry_jobs(self, statuses=(FAILED, CANCELED), queue=None, token=None):
        retried, after = [], 0
        while True:
            with self._transaction(timeout=self.timeout) as conn:
                params = {"statuses": json.dumps(list(statuses)), "queue": queue,
                          "token": token, "after": after, "limit": PURGE_BATCH}
                rows = conn.execute(self.RETRY_CANDIDATE if token else self.RETRY_CANDIDATES,
                                    params).fetchall()
                keys = {key for _, _, key in rows if key is not None}
                held = {key for (key,) in conn.execute(self.LIVE_KEYS, {
                    "keys": json.dumps(sorted(keys))})} if keys else set()
                ids = _retryable(rows, held)
                tokens = [token for (token,) in conn.execute(self.REQUEUE, {
                    "ids": json.dumps(ids), "now": time.time()})] if ids else []
                self._count(conn, queued=len(tokens))
            retried += tokens
            if token or len(rows) < PURGE_BATCH:
                return retried
            after = rows[-1][0]

    def cancel_jobs(self, statuses=(QUEUED, RUNNING), queue=None):
        canceled = []
        while True:
            with self._transaction(timeout=self.timeout) as conn:
                rows = conn.execute(self.CANCEL_CANDIDATES, {
                    "statuses": json.dumps(list(statuses)), "queue": queue,
                    "limit": PURGE_BATCH}).fetchall()
                conn.execute(self.CANCEL_IDS, {"ids": json.dumps([row[0] for row in rows]),
                                               "now": time.time()})
                self._count(conn, finished_canceled=len(rows),
                            queued=-sum(status == QUEUED for _, _, status in rows))
            canceled += [(token, status) for _, token, status in rows]
            if len(rows) < PURGE_BATCH:
                return canceled

    def release(self, owner):
        with self._transaction() as conn:
            rows = conn.execute(self.RELEASE, (owner,)).fetchall()
            self._count(conn, queued=len(rows))
        return [token for (token,) in rows]

    def running_owners(self):
        return [owner for (owner,) in self._read(self.RUNNING_OWNERS)]

    def recover(self, max_attempts, lost_owners=()):
        params = {"now": time.time(), "lost": self._json_list(lost_owners),
                  "most": max_attempts}
        if not self._read(self.ANY_LOST, params):
            return []  # the usual case, and a read takes no write lock
        with self._transaction() as conn:
            rows = conn.execute(self.RECOVER, params).fetchall()
            failed = sum(status == FAILED for _, status in rows)
            self._count(conn, finished_failed=failed, queued=len(rows) - failed)
        return rows

    def purge(self, retention, batch=PURGE_BATCH):
        with self._transaction() as conn:
            before = time.time() - retention
            return (conn.execute(self.PURGE_JOBS, (before, batch)).rowcount
                    + conn.execute(self.PURGE_BATCHES, (before, batch)).rowcount)

    def maintain(self):
        """Prune the starts no rate window counts and the processes gone an hour (the
        claim's queries name their indexes: INDEXED BY, no statistics needed)."""
        with self._transaction() as conn:
            now = time.time()
            conn.execute(self.PRUNE_STARTS, (now,))
            conn.execute(self.PURGE_PROCESSES, (now - GONE_KEPT,))

    def expire(self):
        params = {"now": time.time()}
        if not self._read(self.ANY_EXPIRED, params):
            return []
        with self._transaction() as conn:
            rows = conn.execute(self.EXPIRE, params).fetchall()
            self._count(conn, finished_canceled=len(rows), queued=-len(rows))
        return [token for (token,) in rows]

    def put_schedule(self, name, schedule):
        with self._transaction(timeout=self.timeout) as conn:
            now = time.time()
            before = _schedule(conn.execute(self.GET_SCHEDULE, (name,)).fetchone())
            conn.execute(self.PUT_SCHEDULE, {
                **schedule, "name": name, "job": json.dumps(schedule["job"]), "now": now,
                "next_run_at": _next_run_at(before, schedule, now)})
            after = _schedule(conn.execute(self.GET_SCHEDULE, (name,)).fetchone())
        return after, before is None

    def schedule(self, name):
        return _schedule(next(iter(self._read(self.GET_SCHEDULE, (name,))), None))

    def schedules(self):
        return [_schedule(row) for row in self._read(self.LIST_SCHEDULES)]

    def delete_schedule(self, name):
        with self._transaction(timeout=self.timeout) as conn:
            return _schedule(conn.execute(self.DELETE_SCHEDULE, (name,)).fetchone())

    def next_schedule(self):
        ((next_run_at,),) = self._read(self.NEXT_SCHEDULE)
        return None if next_run_at is None else max(0.0, next_run_at - time.time())

    def fire_schedules(self, retries=0):
        due = self.next_schedule()
        if due is None or due > 0:
            return []  # the usual case, and a read takes no write lock
        with self._transaction() as conn:
            now = time.time()
            rows = conn.execute(self.DUE_SCHEDULES, {"now": now, "limit": FIRE_BATCH}).fetchall()
            fired = _fired(map(_schedule, rows), now, retries)
            jobs, duplicates = self._sort_out(conn, [job for _, _, job in fired], now)
            named = self._name_queues(conn, jobs)
            conn.executemany(self.INSERT_SCHEDULED_JOB, [
                (job.token, job.item, job.valor, now, now, job.queue, job.priority, job.retries,
                 job.unique, now + job.expires if job.expires else None, job.schedule, job.slot,
                 job.timeout or None)
                for job in jobs])
            conn.executemany(self.SCHEDULE_FIRED, [
                (next_slot(schedule, now), slot,
                 duplicates[n][0] if n in duplicates else job.token, schedule["name"])
                for n, (schedule, slot, job) in enumerate(fired)])
            self._count(conn, submitted=len(jobs), queued=len(jobs), duplicate=len(duplicates))
        self._named = self._named | named
        return [job.token for job in jobs]

    def queues(self, name=None):
        return _queue_views(self._read(self.LIST_QUEUES, {"name": name}),
                            self._read(self.QUEUE_COUNTS, {"name": name}))

    def set_queue(self, name, change):
        with self._transaction(timeout=self.timeout) as conn:
            before = _queue(conn.execute(self.GET_QUEUE, (name,)).fetchone() or (name, 0, None,
                                                                                    None, None))
            conn.execute(self.PUT_QUEUE, {**_queue_params(name, change(before)),
                                          "now": time.time()})

    def queue_limits(self):
        return {row[0]: _queue(row) for row in self._read(self.QUEUE_LIMITS)}

    def register(self, process):
        with self._transaction(durable=False) as conn:
            conn.execute(self.REGISTER, {**_process_params(process), "now": time.time()})

    def heartbeat(self, process_id, workers):
        with self._transaction(durable=False) as conn:
            return conn.execute(self.HEARTBEAT, (time.time(), workers, process_id)).rowcount > 0

    def unregister(self, process_id):
        with self._transaction(durable=False) as conn:
            now = time.time()
            conn.execute(self.UNREGISTER, (now, now, process_id))

    def processes(self):
        rows = self._read(self.LIST_PROCESSES, {"now": time.time(), "alive": ALIVE_WITHIN})
        return _fleet(rows, self._read(self.BUSY))

    def listen(self, most):
        """PRAGMA data_version changes when another connection commits; only then
        is the store read, so an idle process costs a cheap look every 5 ms."""
        if self.path == ":memory:":  # no other process can see this database
            return _NoListener()
        return _SQLiteListener(self, most)


class _SQLiteListener(Listener):
    def __init__(self, store, most):
        self._store, self._most = store, most
        self._version = self._changes = None

    def wait(self, timeout):
        store = self._store
        deadline = time.monotonic() + timeout
        while True:
            # The store's own connection: its data_version moves only when another
            # connection commits, so this process's own claims and ends wake nobody.
            ((version,),) = store._read(store.DATA_VERSION, on_writer=True)
            if version != self._version:
                self._version = version
                ((ready,),) = store._read(store.READY_COUNT, (time.time(), self._most))
                (changes,) = store._read(store.CHANGES)
                seen, self._changes = self._changes, changes
                return ready, seen is not None and changes != seen
            if time.monotonic() >= deadline:
                return 0, False
            time.sleep(store.listen_interval)


class PostgresStore(Store):
    """The jobs in PostgreSQL: the only code that touches psycopg.

    A psycopg_pool pool per process (made on first use, so a pre-forking host
    never shares it); each public method is one transaction, and every time is
    the database's clock, so hosts with skewed clocks agree on leases. Tables
    are named queue_tool_*, so they can live in an application's database.

    Counters live in shards, one row per (counter, connection), summed on read: no
    single row that every claim, finish and submit must lock. A statement that
    changes jobs counts its change in a `counted` CTE of its own: one round trip.
    Every statement that may wait for several job rows locks them in id order
    (ORDER BY id FOR UPDATE), so two of them (a finish and a lease renewal, say)
    can never each hold a row the other wants: no deadlock. Claims never wait
    (SKIP LOCKED).

    A submit with unique keys takes a transaction-level advisory lock on each key
    (in one order) before it looks for the jobs holding them, so two submits of one
    key across machines take turns; a partial unique index backs it up. Schedules
    due now are locked with SKIP LOCKED: processes firing at once share them out.
    """

    # (Shared by SCHEMA and version 4's upgrade; see SQLiteStore's.)
    UNIQUE_AND_SCHEDULES = (
        """CREATE INDEX queue_tool_jobs_unique_key ON queue_tool_jobs (unique_key, id)
            WHERE unique_key IS NOT NULL""",
        """CREATE UNIQUE INDEX queue_tool_jobs_unique_live ON queue_tool_jobs (unique_key)
            WHERE unique_key IS NOT NULL AND status IN ('queued', 'running')""",
        """CREATE UNIQUE INDEX queue_tool_jobs_slot ON queue_tool_jobs (schedule, slot)
            WHERE schedule IS NOT NULL""",
        """CREATE INDEX queue_tool_jobs_expires ON queue_tool_jobs (expires_at)
            WHERE status = 'queued' AND expires_at IS NOT NULL""",
        """CREATE TABLE queue_tool_schedules (
            name text PRIMARY KEY,
            cron text,
            every double precision,
            timezone text,
            job text NOT NULL,
            paused boolean NOT NULL DEFAULT false,
            next_run_at timestamptz NOT NULL,
            last_run_at timestamptz,
            last_job text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE INDEX queue_tool_schedules_next ON queue_tool_schedules (next_run_at)
            WHERE NOT paused""",
    )
    # (Shared by SCHEMA and version 5's upgrade; see SQLiteStore's.)
    QUEUES = (
        """CREATE TABLE queue_tool_queues (
            name text PRIMARY KEY,
            paused boolean NOT NULL DEFAULT false,
            concurrency integer,
            rate_limit integer,
            rate_per double precision,
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE queue_tool_queue_starts (
            queue text NOT NULL,
            at timestamptz NOT NULL,
            count integer NOT NULL)""",
        """CREATE INDEX queue_tool_queue_starts_queue_at ON queue_tool_queue_starts (queue, at)""",
    )
    # (Shared by SCHEMA and version 6's upgrade; see SQLiteStore's.)
    PROCESSES = (
        """CREATE TABLE queue_tool_processes (
            id text PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            version text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            stopped_at timestamptz,
            http boolean NOT NULL,
            workers integer NOT NULL,
            queues text)""",
    )

    # -- Schema: the tables as they are now, and how an older database gets there.
    VERSION = 6
    SCHEMA = (
        """CREATE TABLE queue_tool_jobs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            token text NOT NULL UNIQUE,
            item text NOT NULL,
            valor numeric NOT NULL,
            status text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            started_at timestamptz,
            finished_at timestamptz,
            attempts integer NOT NULL DEFAULT 0,
            owner text,
            lease_until timestamptz,
            progress double precision,
            result text,
            error text,
            queue text NOT NULL DEFAULT 'default',
            priority smallint NOT NULL DEFAULT 0,
            run_at timestamptz NOT NULL DEFAULT now(),
            retries smallint NOT NULL DEFAULT 0,
            retried smallint NOT NULL DEFAULT 0,
            batch text,
            unique_key text,
            expires_at timestamptz,
            schedule text,
            slot timestamptz,
            timeout double precision)""",
        "CREATE INDEX queue_tool_jobs_status_id ON queue_tool_jobs (status, id)",
        "CREATE INDEX queue_tool_jobs_running ON queue_tool_jobs (owner) WHERE status = 'running'",
        """CREATE INDEX queue_tool_jobs_finished_at ON queue_tool_jobs (finished_at)
            WHERE finished_at IS NOT NULL""",
        # The claim's order over only the queued rows, and their next start.
        """CREATE INDEX queue_tool_jobs_ready ON queue_tool_jobs (priority DESC, run_at, id)
            WHERE status = 'queued'""",
        "CREATE INDEX queue_tool_jobs_due ON queue_tool_jobs (run_at) WHERE status = 'queued'",
        """CREATE INDEX queue_tool_jobs_batch ON queue_tool_jobs (batch, id)
            WHERE batch IS NOT NULL""",
        """CREATE TABLE queue_tool_counters (
            name text NOT NULL,
            shard integer NOT NULL,
            value bigint NOT NULL,
            PRIMARY KEY (name, shard))""",
        # Batches, and the idempotency keys and first answers of their submits.
        """CREATE TABLE queue_tool_batches (
            id text PRIMARY KEY,
            created_at timestamptz NOT NULL DEFAULT now(),
            total integer NOT NULL,
            idempotency_key text UNIQUE,
            fingerprint text,
            response text)""",
        """CREATE INDEX queue_tool_batches_created_at ON queue_tool_batches (created_at)""",
        *UNIQUE_AND_SCHEDULES,
        *QUEUES,
        *PROCESSES,
    )
    # (v, statements): what takes a version v-1 database to version v, in order; the
    # result is SCHEMA, which a test checks.
    UPGRADES = (
        (2, ("""ALTER TABLE queue_tool_jobs ADD COLUMN queue text NOT NULL DEFAULT 'default',
                 ADD COLUMN priority smallint NOT NULL DEFAULT 0,
                 ADD COLUMN run_at timestamptz,
                 ADD COLUMN retries smallint NOT NULL DEFAULT 0,
                 ADD COLUMN retried smallint NOT NULL DEFAULT 0""",
             "UPDATE queue_tool_jobs SET run_at = created_at",
             """ALTER TABLE queue_tool_jobs ALTER COLUMN run_at SET DEFAULT now(),
                 ALTER COLUMN run_at SET NOT NULL""",
             "DROP INDEX queue_tool_jobs_queued",
             """CREATE INDEX queue_tool_jobs_ready ON queue_tool_jobs (priority DESC, run_at, id)
                 WHERE status = 'queued'""",
             """CREATE INDEX queue_tool_jobs_due ON queue_tool_jobs (run_at)
                 WHERE status = 'queued'""")),
        (3, ("""CREATE TABLE queue_tool_batches (id text PRIMARY KEY,
                 created_at timestamptz NOT NULL DEFAULT now(), total integer NOT NULL,
                 idempotency_key text UNIQUE, fingerprint text, response text)""",
             "CREATE INDEX queue_tool_batches_created_at ON queue_tool_batches (created_at)",
             "ALTER TABLE queue_tool_jobs ADD COLUMN batch text",
             """CREATE INDEX queue_tool_jobs_batch ON queue_tool_jobs (batch, id)
                 WHERE batch IS NOT NULL""")),
        (4, ("""ALTER TABLE queue_tool_jobs ADD COLUMN unique_key text,
                 ADD COLUMN expires_at timestamptz, ADD COLUMN schedule text,
                 ADD COLUMN slot timestamptz""",
             *UNIQUE_AND_SCHEDULES)),
        (5, ("ALTER TABLE queue_tool_jobs ADD COLUMN timeout double precision", *QUEUES,
             """INSERT INTO queue_tool_queues (name)
                 SELECT DISTINCT queue FROM queue_tool_jobs""")),
        (6, PROCESSES),
    )
    # Processes starting together set the schema up one at a time.
    LOCK_SCHEMA = f"SELECT pg_advisory_xact_lock({0x7175657565})"
    SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS queue_tool_schema (version integer NOT NULL)"
    SCHEMA_VERSION = "SELECT version FROM queue_tool_schema"
    INSERT_SCHEMA_VERSION = f"INSERT INTO queue_tool_schema (version) VALUES ({VERSION})"
    SET_SCHEMA_VERSION = f"UPDATE queue_tool_schema SET version = {VERSION}"
    ADD_COUNTERS = """INSERT INTO queue_tool_counters (name, shard, value)
        SELECT unnest(%(names)s::text[]), 0, 0 ON CONFLICT DO NOTHING"""
    # Fresh statistics, so that the planner walks the claim's partial index in order
    # instead of sorting every queued row: a queue that grew faster than autovacuum
    # looks (once a minute) would otherwise make each claim slower than the last.
    ANALYZE = "ANALYZE queue_tool_jobs"

    # -- Submitting. The batch (and its key) before the jobs: a concurrent submit with
    # the same key waits on the unique index until this one commits or rolls back.
    INSERT_BATCH = """INSERT INTO queue_tool_batches (id, total, idempotency_key, fingerprint,
            response)
        VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"""
    BATCH_OF_KEY = """SELECT fingerprint, response FROM queue_tool_batches
        WHERE idempotency_key = %s"""
    QUEUED_GAUGE = """SELECT coalesce(sum(value), 0) FROM queue_tool_counters
        WHERE name = 'queued'"""
    # The jobs' queues get a row each (in order, so two first submits of two new
    # queues cannot deadlock); an existing row is neither written nor locked.
    NAME_QUEUES = """WITH named AS (
            INSERT INTO queue_tool_queues (name)
            SELECT DISTINCT name FROM unnest(%(queues)s::text[]) AS name ORDER BY name
            ON CONFLICT DO NOTHING)
        """
    INSERT_JOBS = NAME_QUEUES + """INSERT INTO queue_tool_jobs (token, item, valor, run_at,
            priority, queue, retries, batch, status, unique_key, expires_at, timeout)
        SELECT token, item, valor, now() + delay * interval '1 second', priority, queue,
            retries, %(batch)s, 'queued', unique_key,
            CASE WHEN expires > 0 THEN now() + (delay + expires) * interval '1 second' END,
            nullif(timeout, 0)
        FROM unnest(%(tokens)s::text[], %(items)s::text[], %(valors)s::numeric[],
            %(delays)s::float8[], %(priorities)s::smallint[], %(queues)s::text[],
            %(retries)s::smallint[], %(unique_keys)s::text[], %(expires)s::float8[],
            %(timeouts)s::float8[]) WITH ORDINALITY
            AS j (token, item, valor, delay, priority, queue, retries, unique_key, expires,
                  timeout, n)
        ORDER BY n"""
    # A schedule slot's jobs (see SQLiteStore's INSERT_SCHEDULED_JOB).
    INSERT_SCHEDULED_JOBS = NAME_QUEUES + """INSERT INTO queue_tool_jobs (token, item, valor,
            priority, queue, retries, status, unique_key, expires_at, schedule, slot, timeout)
        SELECT token, item, valor, priority, queue, retries, 'queued', unique_key,
            CASE WHEN expires > 0 THEN now() + expires * interval '1 second' END,
            schedule, to_timestamp(slot), nullif(timeout, 0)
        FROM unnest(%(tokens)s::text[], %(items)s::text[], %(valors)s::numeric[],
            %(priorities)s::smallint[], %(queues)s::text[], %(retries)s::smallint[],
            %(unique_keys)s::text[], %(expires)s::float8[], %(timeouts)s::float8[],
            %(schedules)s::text[], %(slots)s::float8[])
            AS j (token, item, valor, priority, queue, retries, unique_key, expires, timeout,
                  schedule, slot)
        ON CONFLICT (schedule, slot) WHERE schedule IS NOT NULL DO NOTHING"""
    # Unique keys. A submit of a few keys takes the keys' lock shared, then a lock on
    # each key (on its hash: two keys may share one, and then only wait for each
    # other), in order, so two submits cannot deadlock; one of more keys than
    # MAX_KEY_LOCKS takes the keys' lock alone, exclusive, so no transaction holds
    # more locks than PostgreSQL's lock table allows each (max_locks_per_transaction).
    # Then, in a statement of its own (a snapshot taken after the locks), the jobs
    # that keep the keys out: a live one first, else the newest within unique_for.
    MAX_KEY_LOCKS = 64
    LOCK_SOME_KEYS = f"SELECT pg_advisory_xact_lock_shared({0x756e697175})"
    LOCK_ALL_KEYS = f"SELECT pg_advisory_xact_lock({0x756e697175})"
    LOCK_KEYS = """SELECT pg_advisory_xact_lock(h) FROM (
            SELECT DISTINCT hashtextextended(key, 7435) AS h FROM unnest(%(keys)s::text[]) AS key
            ORDER BY h) AS locks"""
    # (One index look-up per key, LATERAL: as a join, a table whose statistics are
    # not yet fresh was scanned whole for each submit, slower as it grew.)
    DUPLICATES_OF = """SELECT k.key, j.token, j.status
        FROM unnest(%(keys)s::text[], %(fors)s::float8[]) AS k (key, seconds)
        CROSS JOIN LATERAL (
            SELECT token, status FROM queue_tool_jobs
            WHERE unique_key = k.key
              AND (status IN ('queued', 'running')
                   OR (k.seconds > 0 AND created_at >= now() - k.seconds * interval '1 second'))
            ORDER BY status IN ('queued', 'running') DESC, id DESC LIMIT 1) AS j"""
    COUNT = """INSERT INTO queue_tool_counters AS c (name, shard, value)
        SELECT name, mod(pg_backend_pid(), 64), delta
        FROM unnest(%(names)s::text[], %(deltas)s::bigint[]) AS d (name, delta)
        WHERE delta <> 0 ORDER BY name
        ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value"""
    NOTIFY = "SELECT pg_notify('queue_tool', %s)"

    # -- Reading jobs and batches: times as epoch seconds, as SQLite has them.
    COLUMNS = """token, item, valor, status,
        extract(epoch FROM created_at)::float8 AS created_at,
        extract(epoch FROM started_at)::float8 AS started_at,
        extract(epoch FROM finished_at)::float8 AS finished_at,
        attempts, owner, extract(epoch FROM lease_until)::float8 AS lease_until,
        progress, result, error, queue, priority, extract(epoch FROM run_at)::float8 AS run_at,
        retries, retried, batch, unique_key,
        extract(epoch FROM expires_at)::float8 AS expires_at, schedule, timeout"""
    GET_JOB = f"SELECT {COLUMNS} FROM queue_tool_jobs WHERE token = %s"
    GET_BATCH = f"""SELECT extract(epoch FROM b.created_at)::float8, b.total, j.*
        FROM queue_tool_batches AS b
        LEFT JOIN LATERAL (SELECT {COLUMNS} FROM queue_tool_jobs WHERE batch = b.id ORDER BY id)
            AS j ON true
        WHERE b.id = %s"""
    LIST = f"""SELECT {COLUMNS}, id FROM queue_tool_jobs
        WHERE id < %(before)s AND (%(queue)s::text IS NULL OR queue = %(queue)s)
        ORDER BY id DESC LIMIT %(limit)s"""
    LIST_BY_STATUS = f"""SELECT {COLUMNS}, id FROM queue_tool_jobs
        WHERE status = %(status)s AND id < %(before)s
          AND (%(queue)s::text IS NULL OR queue = %(queue)s)
        ORDER BY id DESC LIMIT %(limit)s"""
    COUNTS = """SELECT (SELECT coalesce(sum(value), 0) FROM queue_tool_counters
            WHERE name = 'queued'),
        (SELECT count(*) FROM queue_tool_jobs WHERE status = 'running')"""
    COUNTER_VALUES = "SELECT name, sum(value) FROM queue_tool_counters GROUP BY name"

    # -- Claiming and ending runs. The claim chooses its jobs in a MATERIALIZED CTE:
    # as `id IN (SELECT ... SKIP LOCKED)` the planner may run the subquery again for
    # each row it updates, and each run skips other rows, so one claim could take
    # (and lose) far more jobs than asked. Its LIMIT is written into the text
    # (CLAIM.format(limit=n)), not bound: with a bound LIMIT the cached plan cannot
    # know the row count, and PostgreSQL plans every claim anew (measured: a quarter
    # of the transaction's time).
    #
    # A claim of queues without limits is CLAIM; with some limited, CLAIM_LIMITED
    # claims the limited ones not paused, then the others (skipping the limited),
    # after LOCK_QUEUES took their locks (transaction-level
    # advisory locks, on the queue names' hashes, in order: only these claims take
    # them). A statement of its own after the locks, so its snapshot sees every
    # claim of those queues committed before: their running jobs and recorded
    # starts, counted under the lock, so no claim anywhere can overshoot.
    IN_QUEUES = "(%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s))"
    NOT_SKIPPED = "queue <> ALL(%(skip)s::text[])"
    NEXT_DUE_OF = """SELECT extract(epoch FROM min(run_at) - now())::float8 FROM queue_tool_jobs
        WHERE status = 'queued' AND {}"""
    NEXT_DUE, NEXT_DUE_EXCEPT = NEXT_DUE_OF.format(IN_QUEUES), NEXT_DUE_OF.format(NOT_SKIPPED)
    CLAIM_OF = f"""WITH next AS MATERIALIZED (
            SELECT id FROM queue_tool_jobs
            WHERE status = 'queued' AND run_at <= now()
              AND (expires_at IS NULL OR expires_at > now() OR attempts > 0)
              AND {{queues}}
            ORDER BY priority DESC, run_at, id LIMIT {{limit}}
            FOR UPDATE SKIP LOCKED),
        job AS (
            UPDATE queue_tool_jobs AS j SET status = 'running', owner = %(owner)s,
                lease_until = now() + %(lease)s * interval '1 second', started_at = now(),
                attempts = j.attempts + 1, progress = NULL
            FROM next WHERE j.id = next.id
            RETURNING {COLUMNS}),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT 'queued', mod(pg_backend_pid(), 64), -count(*) FROM job HAVING count(*) > 0
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT * FROM job ORDER BY priority DESC, run_at, created_at"""
    CLAIM = CLAIM_OF.replace("{queues}", IN_QUEUES)
    LOCK_QUEUES = """SELECT pg_advisory_xact_lock(h) FROM (
            SELECT DISTINCT hashtextextended(name, 8123) AS h
            FROM unnest(%(names)s::text[]) AS name ORDER BY h) AS locks"""
    # A limited queue's starts left, by its concurrency and by its rate (NULL: no
    # such limit), at clock.now: its running jobs (few: the index's running rows),
    # and the starts in its window.
    RUNNING_OF = """(SELECT count(*) FROM queue_tool_jobs
        WHERE status = 'running' AND queue = q.name)"""
    STARTS_OF = """(SELECT {} FROM queue_tool_queue_starts AS s
        WHERE s.queue = q.name AND s.at > clock.now - q.rate_per * interval '1 second')"""
    LIMITED = """FROM queue_tool_queues AS q, clock
        WHERE q.name = ANY(%(names)s::text[]) AND NOT q.paused"""
    # The clock is read once, after the locks (now() is the transaction's start,
    # which may be before another claim's): the starts it records, in order. The
    # jobs of the other queues (those of the claim not limited) come after, up to
    # the claim's count: one statement, so the transaction is one round trip. That
    # part walks past every ready job of the skipped queues: not when no other queue
    # exists (a queue's row comes in its first job's transaction).
    CLAIM_LIMITED = f"""WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
        room AS MATERIALIZED (
            SELECT q.name, q.rate_limit IS NOT NULL AS rated, greatest(0, coalesce(least(
                q.concurrency - {RUNNING_OF},
                q.rate_limit - {STARTS_OF.format("coalesce(sum(s.count), 0)")}), {{limit}})) AS n
            {LIMITED}),
        next AS MATERIALIZED (
            (SELECT c.id FROM room CROSS JOIN LATERAL (
                SELECT id FROM queue_tool_jobs
                WHERE status = 'queued' AND queue = room.name AND run_at <= now()
                  AND (expires_at IS NULL OR expires_at > now() OR attempts > 0)
                ORDER BY priority DESC, run_at, id LIMIT room.n
                FOR UPDATE SKIP LOCKED) AS c)
            UNION ALL
            (SELECT o.id FROM (
                SELECT id FROM queue_tool_jobs
                WHERE %(others)s AND status = 'queued' AND run_at <= now()
                  AND (expires_at IS NULL OR expires_at > now() OR attempts > 0)
                  AND {IN_QUEUES} AND {NOT_SKIPPED}
                  AND EXISTS (SELECT FROM queue_tool_queues WHERE name <> ALL(%(skip)s))
                ORDER BY priority DESC, run_at, id LIMIT {{limit}}
                FOR UPDATE SKIP LOCKED) AS o)
            LIMIT {{limit}}),
        job AS (
            UPDATE queue_tool_jobs AS j SET status = 'running', owner = %(owner)s,
                lease_until = now() + %(lease)s * interval '1 second', started_at = clock.now,
                attempts = j.attempts + 1, progress = NULL
            FROM next, clock WHERE j.id = next.id
            RETURNING {COLUMNS}),
        started AS (
            INSERT INTO queue_tool_queue_starts (queue, at, count)
            SELECT job.queue, clock.now, count(*) FROM job, clock, room
            WHERE room.name = job.queue AND room.rated GROUP BY job.queue, clock.now),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT 'queued', mod(pg_backend_pid(), 64), -count(*) FROM job HAVING count(*) > 0
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT * FROM job ORDER BY priority DESC, run_at, created_at"""
    # Their rows for _limited_due.
    LIMITED_DUE = f"""WITH clock AS (SELECT now() AS now)
        SELECT extract(epoch FROM (SELECT min(run_at) FROM queue_tool_jobs
                WHERE status = 'queued' AND queue = q.name) - clock.now)::float8,
            q.concurrency - {RUNNING_OF},
            q.rate_limit - {STARTS_OF.format("coalesce(sum(s.count), 0)")},
            extract(epoch FROM {STARTS_OF.format("min(s.at)")}
                + q.rate_per * interval '1 second' - clock.now)::float8
        {LIMITED}"""
    FINISH = """WITH mine AS MATERIALIZED (
            SELECT j.id, f.status, f.result, f.error
            FROM queue_tool_jobs AS j
            JOIN unnest(%(tokens)s::text[], %(attempts)s::integer[], %(statuses)s::text[],
                %(results)s::text[], %(errors)s::text[])
                AS f (token, attempt, status, result, error)
                ON j.token = f.token AND j.attempts = f.attempt
            WHERE j.owner = %(owner)s AND j.status = 'running'
            ORDER BY j.id FOR UPDATE OF j),
        done AS (
            UPDATE queue_tool_jobs AS j SET status = mine.status, finished_at = now(),
                result = mine.result, error = mine.error, lease_until = NULL
            FROM mine WHERE j.id = mine.id
            RETURNING j.token, j.status),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT 'finished_' || status, mod(pg_backend_pid(), 64), count(*)
            FROM done GROUP BY status ORDER BY 1
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT token FROM done"""
    RETRY = """WITH job AS (
            UPDATE queue_tool_jobs SET status = 'queued', lease_until = NULL,
                progress = NULL, error = %(error)s,
                run_at = now() + %(delay)s * interval '1 second', retried = retried + 1
            WHERE token = %(token)s AND owner = %(owner)s AND attempts = %(attempt)s
              AND status = 'running'
            RETURNING token),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT name, mod(pg_backend_pid(), 64), 1
            FROM job CROSS JOIN (VALUES ('queued'), ('retried')) AS n (name) ORDER BY name
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT token, pg_notify('queue_tool', 'submitted:1') FROM job"""
    SET_PROGRESS = """UPDATE queue_tool_jobs SET progress = %(progress)s
        WHERE token = %(token)s AND owner = %(owner)s AND attempts = %(attempt)s
          AND status = 'running'"""
    # These runs ({token: attempt}) of an owner, locked in id order.
    MINE = """WITH mine AS MATERIALIZED (
            SELECT j.id FROM queue_tool_jobs AS j
            JOIN unnest(%(tokens)s::text[], %(attempts)s::integer[]) AS r (token, attempt)
                ON j.token = r.token AND j.attempts = r.attempt
            WHERE j.owner = %(owner)s AND j.status = 'running'
            ORDER BY j.id FOR UPDATE OF j)"""
    RENEW = MINE + """
        UPDATE queue_tool_jobs AS j SET lease_until = now() + %(lease)s * interval '1 second'
        FROM mine WHERE j.id = mine.id
        RETURNING j.token"""
    UNCLAIM = MINE + """,
        job AS (
            UPDATE queue_tool_jobs AS j SET status = 'queued', owner = NULL, started_at = NULL,
                lease_until = NULL, attempts = j.attempts - 1
            FROM mine WHERE j.id = mine.id RETURNING 1),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT 'queued', mod(pg_backend_pid(), 64), count(*) FROM job HAVING count(*) > 0
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT count(*) FROM job"""

    # -- Canceling.
    LOCK_JOB = f"SELECT {COLUMNS} FROM queue_tool_jobs WHERE token = %s FOR UPDATE"
    CANCEL = f"""UPDATE queue_tool_jobs SET status = 'canceled', finished_at = now(),
            lease_until = NULL
        WHERE token = %s RETURNING {COLUMNS}"""
    BATCH_EXISTS = "SELECT 1 FROM queue_tool_batches WHERE id = %s"
    CANCEL_BATCH = """UPDATE queue_tool_jobs AS j SET status = 'canceled', finished_at = now(),
            lease_until = NULL
        FROM (SELECT id, status FROM queue_tool_jobs
              WHERE batch = %s AND status IN ('queued', 'running')
              ORDER BY id FOR UPDATE) AS old
        WHERE j.id = old.id
        RETURNING j.token, old.status"""

    # -- Retrying and canceling by hand, PURGE_BATCH jobs a transaction (candidates
    # locked, or skipped while a worker ends them); unique keys as a submit takes them.
    RETRY_CANDIDATES = """SELECT id, token, unique_key FROM queue_tool_jobs
        WHERE status = ANY(%(statuses)s::text[])
          AND (%(queue)s::text IS NULL OR queue = %(queue)s) AND id > %(after)s
        ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"""
    RETRY_CANDIDATE = """SELECT id, token, unique_key FROM queue_tool_jobs
        WHERE token = %(token)s AND status = ANY(%(statuses)s::text[]) FOR UPDATE"""
    LIVE_KEYS = """SELECT DISTINCT unique_key FROM queue_tool_jobs
        WHERE unique_key = ANY(%(keys)s::text[]) AND status IN ('queued', 'running')"""
    REQUEUE = """WITH job AS (
            UPDATE queue_tool_jobs SET status = 'queued', run_at = now(), finished_at = NULL,
                lease_until = NULL, progress = NULL, retried = 0,
                expires_at = NULL
            WHERE id = ANY(%(ids)s::bigint[])
            RETURNING token),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT 'queued', mod(pg_backend_pid(), 64), count(*) FROM job HAVING count(*) > 0
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT token FROM job"""
    CANCEL_JOBS = """UPDATE queue_tool_jobs AS j SET status = 'canceled', finished_at = now(),
            lease_until = NULL
        FROM (SELECT id, status FROM queue_tool_jobs
              WHERE status = ANY(%(statuses)s::text[])
                AND (%(queue)s::text IS NULL OR queue = %(queue)s)
              ORDER BY id LIMIT %(limit)s FOR UPDATE) AS old
        WHERE j.id = old.id
        RETURNING j.token, old.status"""

    # -- Taking jobs back: a shutdown, lost leases, dead owners.
    RELEASE = """WITH mine AS MATERIALIZED (
            SELECT id FROM queue_tool_jobs WHERE owner = %s AND status = 'running'
            ORDER BY id FOR UPDATE)
        UPDATE queue_tool_jobs AS j SET status = 'queued', lease_until = NULL,
            progress = NULL
        FROM mine WHERE j.id = mine.id
        RETURNING j.token"""
    RUNNING_OWNERS = """SELECT DISTINCT owner FROM queue_tool_jobs
        WHERE status = 'running' AND owner IS NOT NULL"""
    ANY_LOST = """SELECT 1 FROM queue_tool_jobs
        WHERE status = 'running' AND (lease_until < now() OR owner = ANY(%(lost)s::text[]))
        LIMIT 1"""
    RECOVER = """WITH lost AS MATERIALIZED (
            SELECT id FROM queue_tool_jobs
            WHERE status = 'running' AND (lease_until < now() OR owner = ANY(%(lost)s::text[]))
            ORDER BY id FOR UPDATE)
        UPDATE queue_tool_jobs AS j SET
            status = CASE WHEN attempts >= %(most)s THEN 'failed' ELSE 'queued' END,
            finished_at = CASE WHEN attempts >= %(most)s THEN now() END,
            error = CASE WHEN attempts >= %(most)s
                    THEN 'worker lost after ' || attempts || ' attempts' ELSE error END,
            lease_until = NULL, progress = NULL
        FROM lost WHERE j.id = lost.id
        RETURNING j.token, j.status"""

    # -- Expiry: queued jobs never started, past their time.
    ANY_EXPIRED = """SELECT 1 FROM queue_tool_jobs
        WHERE status = 'queued' AND expires_at <= now() AND attempts = 0 LIMIT 1"""
    EXPIRE = """WITH gone AS MATERIALIZED (
            SELECT id FROM queue_tool_jobs
            WHERE status = 'queued' AND expires_at <= now() AND attempts = 0
            ORDER BY id FOR UPDATE SKIP LOCKED),
        job AS (
            UPDATE queue_tool_jobs AS j SET status = 'canceled', finished_at = now(),
                error = 'expired'
            FROM gone WHERE j.id = gone.id
            RETURNING j.token),
        counted AS (
            INSERT INTO queue_tool_counters AS c (name, shard, value)
            SELECT d.name, mod(pg_backend_pid(), 64), d.delta
            FROM (SELECT count(*) AS n FROM job) AS total
            CROSS JOIN LATERAL (VALUES ('finished_canceled', n), ('queued', -n)) AS d (name, delta)
            WHERE total.n > 0 ORDER BY d.name
            ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value)
        SELECT token FROM job"""

    # -- Schedules: times as epoch seconds; the due ones locked, or skipped while
    # another process is making their jobs.
    SCHEDULE_COLUMNS = """name, cron, every, timezone, job, paused,
        extract(epoch FROM next_run_at)::float8, extract(epoch FROM last_run_at)::float8,
        last_job, extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8"""
    NOW = "SELECT extract(epoch FROM now())::float8"
    GET_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM queue_tool_schedules WHERE name = %s"
    LOCK_SCHEDULE = f"""SELECT {SCHEDULE_COLUMNS} FROM queue_tool_schedules WHERE name = %s
        FOR UPDATE"""
    LIST_SCHEDULES = f"SELECT {SCHEDULE_COLUMNS} FROM queue_tool_schedules ORDER BY name"
    PUT_SCHEDULE = f"""INSERT INTO queue_tool_schedules (name, cron, every, timezone, job, paused,
            next_run_at)
        VALUES (%(name)s, %(cron)s, %(every)s, %(timezone)s, %(job)s, %(paused)s,
            to_timestamp(%(next_run_at)s))
        ON CONFLICT (name) DO UPDATE SET cron = EXCLUDED.cron, every = EXCLUDED.every,
            timezone = EXCLUDED.timezone, job = EXCLUDED.job, paused = EXCLUDED.paused,
            next_run_at = EXCLUDED.next_run_at, updated_at = now()
        RETURNING {SCHEDULE_COLUMNS}"""
    DELETE_SCHEDULE = f"""DELETE FROM queue_tool_schedules WHERE name = %s
        RETURNING {SCHEDULE_COLUMNS}"""
    NEXT_SCHEDULE = """SELECT extract(epoch FROM min(next_run_at) - now())::float8
        FROM queue_tool_schedules WHERE NOT paused"""
    DUE_SCHEDULES = f"""SELECT {SCHEDULE_COLUMNS}, extract(epoch FROM now())::float8
        FROM queue_tool_schedules
        WHERE NOT paused AND next_run_at <= now()
        ORDER BY next_run_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"""
    SCHEDULE_FIRED = """UPDATE queue_tool_schedules AS s SET next_run_at = to_timestamp(f.next),
            last_run_at = to_timestamp(f.slot), last_job = f.job
        FROM unnest(%(names)s::text[], %(nexts)s::float8[], %(slots)s::float8[],
            %(jobs)s::text[]) AS f (name, next, slot, job)
        WHERE s.name = f.name"""

    # -- Queues: their settings, and their jobs by live state.
    QUEUE_COLUMNS = ", ".join(QUEUE_FIELDS)
    LIST_QUEUES = f"""SELECT {QUEUE_COLUMNS} FROM queue_tool_queues
        WHERE %(name)s::text IS NULL OR name = %(name)s ORDER BY name"""
    QUEUE_COUNTS = """SELECT queue, status, count(*) FROM queue_tool_jobs
        WHERE status IN ('queued', 'running') AND (%(name)s::text IS NULL OR queue = %(name)s)
        GROUP BY queue, status"""
    QUEUE_LIMITS = f"""SELECT {QUEUE_COLUMNS} FROM queue_tool_queues
        WHERE paused OR concurrency IS NOT NULL OR rate_limit IS NOT NULL"""
    NAME_QUEUE = "INSERT INTO queue_tool_queues (name) VALUES (%s) ON CONFLICT DO NOTHING"
    LOCK_QUEUE = f"SELECT {QUEUE_COLUMNS} FROM queue_tool_queues WHERE name = %s FOR UPDATE"
    PUT_QUEUE = """UPDATE queue_tool_queues SET paused = %(paused)s,
            concurrency = %(concurrency)s, rate_limit = %(rate_limit)s,
            rate_per = %(rate_per)s, updated_at = now()
        WHERE name = %(name)s"""
    # The starts that no window counts any more.
    PRUNE_STARTS = """DELETE FROM queue_tool_queue_starts AS s
        WHERE at <= now() - coalesce((SELECT rate_per FROM queue_tool_queues
            WHERE name = s.queue AND rate_limit IS NOT NULL), 0) * interval '1 second'"""

    # -- The fleet (see SQLiteStore's).
    REGISTER = """INSERT INTO queue_tool_processes (id, host, pid, version, http, workers, queues)
        VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(http)s, %(workers)s, %(queues)s)
        ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL,
            http = excluded.http, workers = excluded.workers, queues = excluded.queues"""
    HEARTBEAT = """UPDATE queue_tool_processes SET heartbeat_at = now(), workers = %s
        WHERE id = %s AND stopped_at IS NULL RETURNING id"""
    UNREGISTER = """UPDATE queue_tool_processes SET heartbeat_at = now(), stopped_at = now()
        WHERE id = %s"""
    LIST_PROCESSES = """SELECT id, host, pid, version, extract(epoch FROM started_at)::float8,
            extract(epoch FROM heartbeat_at)::float8, http, workers, queues,
            stopped_at IS NULL AND heartbeat_at > now() - %s * interval '1 second'
        FROM queue_tool_processes"""
    BUSY = "SELECT owner, count(*) FROM queue_tool_jobs WHERE status = 'running' GROUP BY owner"
    PURGE_PROCESSES = """DELETE FROM queue_tool_processes
        WHERE heartbeat_at < now() - %s * interval '1 second'"""

    # -- Retention.
    PURGE_JOBS = """DELETE FROM queue_tool_jobs WHERE id IN (
        SELECT id FROM queue_tool_jobs
        WHERE finished_at < now() - %s * interval '1 second' LIMIT %s)"""
    PURGE_BATCHES = """DELETE FROM queue_tool_batches WHERE id IN (
        SELECT id FROM queue_tool_batches AS b
        WHERE created_at < now() - %s * interval '1 second'
          AND NOT EXISTS (SELECT 1 FROM queue_tool_jobs WHERE batch = b.id)
        LIMIT %s)"""

    # -- The listener's own session.
    LISTEN = "LISTEN queue_tool"

    # -- Every transaction's bound: a statement (and its lock waits) ends with an error
    # once the time is up; LOCAL, so nothing stays on the session (PgBouncer).
    BOUND = """SELECT set_config('statement_timeout', %(ms)s, true),
        set_config('lock_timeout', %(ms)s, true)"""
    # The same for a whole session of our own (a direct one, or a session-mode
    # pool's), set as the pool opens it: then a request's read needs no more.
    SESSION_BOUND = """SELECT set_config('statement_timeout', %(ms)s, false),
        set_config('lock_timeout', %(ms)s, false)"""
    # The group commit's own: the workers' longer bound, and no wait for the WAL
    # flush (a claim or an end lost with a server crash only runs a job again).
    WORK_SETTINGS = f"""SELECT set_config('synchronous_commit', 'off', true),
        set_config('statement_timeout', '{int(WORK_TIMEOUT * 1000)}', true),
        set_config('lock_timeout', '{int(WORK_TIMEOUT * 1000)}', true)"""

    def __init__(self, url, pool_size=24, connect_timeout=5, pooled=False, listen_url=None,
                 timeout=5.0):
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise SettingsError("db: a PostgreSQL URL needs psycopg and psycopg_pool:"
                                " pip install 'queue_tool[postgres]'") from None
        self._psycopg, self._psycopg_pool = psycopg, psycopg_pool
        self.url, self._shown = url, redact(url)
        self._secrets = sorted({*_passwords(url), *_passwords(listen_url or url)},
                               key=len, reverse=True)
        self.pool_size, self.connect_timeout, self.timeout = pool_size, connect_timeout, timeout
        # Behind a transaction-mode pool the next transaction may run on another
        # server session: no statement is prepared (psycopg would, after 5 runs).
        self.pooled, self.listen_url = pooled, listen_url
        self._session_options = {"autocommit": True, "connect_timeout": connect_timeout,
                                 **({"prepare_threshold": None} if pooled else {})}
        self._lock = threading.Lock()  # guards self._pool, self._pid, self._closed
        self._pool = self._pid = None
        self._group = _Group(self._commit_group)
        self._closed = False
        try:
            with self._errors(), self._connect() as conn:
                with conn.transaction():
                    self._migrate(conn)
                conn.execute(self.ANALYZE)
        except StoreError as exc:
            raise StoreError(f"cannot use database {self._shown}: {exc}") from None
        _fork_sensitive.add(self)

    def _bound_session(self, conn):
        conn.execute(self.SESSION_BOUND, {"ms": str(max(1, int(self.timeout * 1000)))})

    def _connect(self, url=None):
        """A connection of its own (the schema set-up, the listener): unbounded."""
        return self._psycopg.connect(url or self.url, **self._session_options)

    def _migrate(self, conn):
        conn.execute(self.LOCK_SCHEMA)
        conn.execute(self.SCHEMA_TABLE)
        row = conn.execute(self.SCHEMA_VERSION).fetchone()
        version = 0 if row is None else row[0]
        if version > self.VERSION:
            raise StoreError(f"its schema version {version} is newer than this queue_tool"
                             f" {__version__} knows ({self.VERSION}); upgrade queue_tool")
        for statement in (*self.SCHEMA, self.INSERT_SCHEMA_VERSION) if version == 0 else ():
            conn.execute(statement)
        for step, statements in self.UPGRADES if version else ():
            for statement in statements if step > version else ():
                conn.execute(statement)
        conn.execute(self.SET_SCHEMA_VERSION)
        conn.execute(self.ADD_COUNTERS, {"names": list(COUNTERS)})

    @contextlib.contextmanager
    def _errors(self):
        """Turn driver errors into StoreError, without a password in the message."""
        try:
            yield
        except self._psycopg.Error as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            for secret in self._secrets:
                message = message.replace(secret, "***")
            raise StoreError(message) from None

    def _pool_here(self):
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            if self._pool is None or self._pid != os.getpid():
                # Short timeouts: in an outage a request answers 503 within
                # seconds, and a pool that gave up reconnecting grows again on
                # the next request instead of backing off for minutes.
                self._pool = self._psycopg_pool.ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, open=True, timeout=5,
                    reconnect_timeout=2, name="queue_tool", kwargs=self._session_options,
                    configure=None if self.pooled else self._bound_session)
                self._pid = os.getpid()
            return self._pool

    def _after_fork(self):
        self._lock = threading.Lock()
        self._pool = None  # the parent's; its threads are not here

    def close(self, final=True):
        with self._lock:
            pool, self._pool = (self._pool if self._pid == os.getpid() else None), None
            self._closed = final
        if pool is not None:
            pool.close()

    @contextlib.contextmanager
    def _connection(self, timeout):
        """A pooled connection within `timeout` seconds, and the BOUND of what is left;
        a failed transaction begun by hand is rolled back before the connection goes
        back to the pool (which would do it too, with a warning)."""
        deadline = time.monotonic() + timeout
        with self._errors(), self._pool_here().connection(timeout=timeout) as conn:
            try:
                yield conn, {"ms": str(max(1, int((deadline - time.monotonic()) * 1000)))}
            except BaseException:
                if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                    with contextlib.suppress(self._psycopg.Error):
                        conn.rollback()
                raise

    @contextlib.contextmanager
    def _transaction(self, timeout=WORK_TIMEOUT):
        with self._connection(timeout) as (conn, bound), conn.transaction():
            conn.execute(self.BOUND, bound)
            yield conn

    def _run(self, sql, params, timeout):
        """Rows of one statement in a transaction of its own, bounded: BEGIN, the
        bound, the statement and COMMIT go out pipelined, in one round trip."""
        with self._connection(timeout) as (conn, bound):
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(self.BOUND, bound)
                cursor = conn.execute(sql, params)
                conn.execute("COMMIT")
            return cursor.fetchall() if cursor.description else []

    def _read(self, sql, params=None):
        """Rows of one query, within the store's timeout. On a session of its own the
        bound is the session's (set as the connection opens: no extra round trip);
        behind a transaction-mode pool, where no session setting lasts, the query
        sets it in a transaction of its own."""
        if self.pooled:
            return self._run(sql, params, self.timeout)
        with self._connection(self.timeout) as (conn, _):
            return conn.execute(sql, params).fetchall()

    def _write(self, sql, params=None):
        """Rows of one statement of the workers' that changes something."""
        return self._run(sql, params, WORK_TIMEOUT)

    @staticmethod
    def _job(row):
        job = _job(row)
        if job is not None:  # numeric keeps 10 apart from 10.0, as JSON does
            valor = job["valor"]
            job["valor"] = int(valor) if valor.as_tuple().exponent >= 0 else float(valor)
        return job

    def _count(self, conn, **deltas):
        if any(deltas.values()):
            conn.execute(self.COUNT, {"names": list(deltas), "deltas": list(deltas.values())})

    # Each method below is one transaction.

    def submit(self, jobs, invalid, max_queued, batch=None, key=None):
        """Group commit (see _Group) for the submits that take no lock: without unique
        keys or an idempotency key. Those that take them keep a transaction each: two
        groups taking keys' locks in different orders could deadlock."""
        jobs = _new_jobs(jobs)
        if key is None and not _first_keys(jobs):
            return self._group.submit((jobs, invalid, max_queued, batch))
        with self._transaction(self.timeout) as conn:
            return self._submit(conn, jobs, invalid, max_queued, batch, key)

    def _commit_group(self, take):
        """The group commit's transaction: each submit in a savepoint of its own
        when there are several, and one NOTIFY for them all (PostgreSQL delivers
        one of several identical ones in a transaction)."""
        with self._transaction(self.timeout) as conn:
            group = take()
            outcomes = [self._submit_in(conn, request, len(group) > 1) for request in group]
            queued = sum(len(request.args[0]) for request, (kind, _) in zip(
                group, outcomes, strict=True) if kind == "ok")
            if queued:
                conn.execute(self.NOTIFY, (f"submitted:{queued}",))
        return outcomes

    def _submit_in(self, conn, request, several):
        """One submit of a group: ("ok", its answer) or ("error", QueueFull), the
        latter rolled back to its savepoint (alone, it rolls the transaction back)."""
        try:
            with conn.transaction() if several else contextlib.nullcontext():
                return "ok", self._submit(conn, *request.args, None, notify=False)
        except QueueFull as exc:
            if not several:
                raise
            return "error", exc

    def _submit(self, conn, jobs, invalid, max_queued, batch, key, notify=True):
        # The unique keys' locks, then the batch's key: a concurrent submit with the
        # same keys waits on them until this one commits or rolls back.
        jobs, duplicates = self._sort_out(conn, jobs)
        response = key and (key[2](duplicates) if callable(key[2]) else key[2])
        taken = batch is None or conn.execute(self.INSERT_BATCH, (
            batch, len(jobs), *(key[:2] if key else (None, None)), response)).fetchone()
        if not taken:
            return {}, tuple(conn.execute(self.BATCH_OF_KEY, (key[0],)).fetchone())
        if jobs:
            (queued,) = conn.execute(self.QUEUED_GAUGE).fetchone()
            if queued + len(jobs) > max_queued:
                raise QueueFull(f"{queued} jobs are queued; the limit is {max_queued}")
        self._insert(conn, jobs, batch, notify=notify)
        self._count(conn, submitted=len(jobs), invalid=invalid, queued=len(jobs),
                    duplicate=len(duplicates))
        return duplicates, None

    def _sort_out(self, conn, jobs):
        """(the new jobs, the duplicates) of `jobs`: see Store.submit."""
        keys = _first_keys(jobs)
        if not keys:
            return jobs, {}
        with conn.pipeline():  # the locks and the look-up in one round trip
            self._lock_keys(conn, list(keys))
            held = conn.execute(self.DUPLICATES_OF, {
                "keys": list(keys), "fors": [float(s) for s in keys.values()]})
        found = {key: (token, status) for key, token, status in held.fetchall()}
        return _sort_out(jobs, found)

    def _lock_keys(self, conn, keys):
        """Take the locks on these unique keys until the transaction ends (see
        LOCK_KEYS): one each for a few, the keys' own lock for many."""
        if len(keys) <= self.MAX_KEY_LOCKS:
            conn.execute(self.LOCK_SOME_KEYS)
            conn.execute(self.LOCK_KEYS, {"keys": keys})
        else:
            conn.execute(self.LOCK_ALL_KEYS)

    def _insert(self, conn, jobs, batch=None, scheduled=False, notify=True):
        if not jobs:
            return
        # One Python type per array: psycopg types a list by its items, and refuses
        # one that mixes them (an int delay beside a float one).
        columns = {
            "tokens": [job.token for job in jobs], "items": [job.item for job in jobs],
            "valors": [decimal.Decimal(repr(job.valor)) for job in jobs],
            "priorities": [int(job.priority) for job in jobs],
            "queues": [job.queue for job in jobs],
            "retries": [int(job.retries) for job in jobs],
            "unique_keys": [job.unique for job in jobs],
            "expires": [float(job.expires) for job in jobs],
            "timeouts": [float(job.timeout) for job in jobs]}
        if scheduled:
            conn.execute(self.INSERT_SCHEDULED_JOBS, {
                **columns, "schedules": [job.schedule for job in jobs],
                "slots": [float(job.slot) for job in jobs]})
        else:
            conn.execute(self.INSERT_JOBS, {**columns, "batch": batch,
                                            "delays": [float(job.delay) for job in jobs]})
        if notify:
            conn.execute(self.NOTIFY, (f"submitted:{len(jobs)}",))

    def get(self, token):
        return self._job(next(iter(self._read(self.GET_JOB, (token,))), None))

    def batch(self, batch_id):
        return _batch(batch_id, self._read(self.GET_BATCH, (batch_id,)), self._job)

    def list(self, status=None, before=None, limit=50, queue=None):
        rows = self._read(self.LIST if status is None else self.LIST_BY_STATUS, {
            "status": status, "queue": queue, "limit": limit + 1,
            "before": LAST_ID if before is None else before})
        next_before = rows[limit - 1][-1] if len(rows) > limit else None
        return [self._job(row) for row in rows[:limit]], next_before

    def counts(self):
        ((queued, running),) = self._read(self.COUNTS)
        return {QUEUED: int(queued), RUNNING: running}

    def counters(self):
        return {name: int(value) for name, value in self._read(self.COUNTER_VALUES)}

    def next_due(self, queues=None, limits=None):
        locked, others, skip = _claim_scope(queues, limits)
        due = _limited_due(self._read(self.LIMITED_DUE, {"names": locked})) if locked else None
        if _others_due_needed(due, others):
            ((seconds,),) = self._read(*(
                (self.NEXT_DUE_EXCEPT, {"skip": skip}) if skip else
                (self.NEXT_DUE, {"queues": list(others) if others else None})))
            due = _sooner(due, None if seconds is None else max(0.0, seconds))
        return due

    def finish_and_claim(self, owner, finishes, claims, lease, queues=None, limits=None):
        locked, others, skip = _claim_scope(queues, limits) if claims else ([], [], None)
        done = taken = None
        with self._connection(WORK_TIMEOUT) as (conn, _):
            # Pipelined: BEGIN, both statements and COMMIT go out at once, and their
            # answers come back together: one round trip for the whole transaction.
            # (psycopg's conn.transaction() would add two more: 0.28 ms against 0.09.)
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(self.WORK_SETTINGS)
                if finishes:
                    tokens, attempts, statuses, results, errors = (
                        list(column) for column in zip(*finishes))
                    done = conn.execute(self.FINISH, {
                        "tokens": tokens, "attempts": attempts, "statuses": statuses,
                        "results": results, "errors": errors, "owner": owner})
                if locked or skip:  # some queues are limited or paused
                    conn.execute(self.LOCK_QUEUES, {"names": locked})
                    taken = conn.execute(self.CLAIM_LIMITED.format(limit=int(claims)), {
                        "names": locked, "owner": owner, "lease": lease,
                        "others": others is None or bool(others), "skip": skip or [],
                        "queues": list(others) if others else None})
                elif claims and (others is None or others):
                    taken = conn.execute(self.CLAIM.format(limit=int(claims)), {
                        "queues": list(others) if others else None, "owner": owner,
                        "lease": lease})
                conn.execute("COMMIT")
            finished = {token for (token,) in done.fetchall()} if done else set()
            claimed = [self._job(row) for row in taken.fetchall()] if taken else []
        return finished, claimed

    def retry(self, token, owner, attempt, error, delay):
        return bool(self._write(self.RETRY, {"error": error, "delay": delay, "token": token,
                                             "owner": owner, "attempt": attempt}))

    def set_progress(self, token, owner, attempt, progress):
        self._write(self.SET_PROGRESS, {"progress": progress, "token": token, "owner": owner,
                                        "attempt": attempt})

    def unclaim(self, owner, runs):
        with self._transaction() as conn:
            ((count,),) = conn.execute(self.UNCLAIM, {
                "tokens": list(runs), "attempts": list(runs.values()), "owner": owner}).fetchall()
            if count:  # other processes' idle workers take them now
                conn.execute(self.NOTIFY, (f"submitted:{count}",))
        return count

    def renew(self, owner, runs, lease):
        rows = self._write(self.RENEW, {"tokens": list(runs), "attempts": list(runs.values()),
                                        "owner": owner, "lease": lease})
        return {token for (token,) in rows}

    def cancel(self, token):
        with self._transaction(self.timeout) as conn:
            before = self._job(conn.execute(self.LOCK_JOB, (token,)).fetchone())
            if before is None or before["status"] in FINAL_STATES:
                return None if before is None else (before, before)
            after = self._job(conn.execute(self.CANCEL, (token,)).fetchone())
            self._count(conn, finished_canceled=1, queued=-(before["status"] == QUEUED))
            if before["status"] == RUNNING:
                conn.execute(self.NOTIFY, ("canceled",))
        return before, after

    def cancel_batch(self, batch_id):
        with self._transaction(self.timeout) as conn:
            if conn.execute(self.BATCH_EXISTS, (batch_id,)).fetchone() is None:
                return None
            rows = conn.execute(self.CANCEL_BATCH, (batch_id,)).fetchall()
            self._count(conn, finished_canceled=len(rows),
                        queued=-sum(status == QUEUED for _, status in rows))
            if any(status == RUNNING for _, status in rows):
                conn.execute(self.NOTIFY, ("canceled",))
        return rows

    def retry_jobs(self, statuses=(FAILED, CANCELED), queue=None, token=None):
        retried, after = [], 0
        while True:
            with self._transaction(self.timeout) as conn:
                params = {"statuses": list(statuses), "queue": queue, "token": token,
                          "after": after, "limit": PURGE_BATCH}
                rows = conn.execute(self.RETRY_CANDIDATE if token else self.RETRY_CANDIDATES,
                                    params).fetchall()
                keys = sorted({key for _, _, key in rows if key is not None})
                held = set()
                if keys:
                    self._lock_keys(conn, keys)
                    held = {key for (key,) in conn.execute(self.LIVE_KEYS, {"keys": keys})}
                ids = _retryable(rows, held)
                tokens = [token for (token,) in conn.execute(
                    self.REQUEUE, {"ids": ids})] if ids else []
                if tokens:
                    conn.execute(self.NOTIFY, (f"submitted:{len(tokens)}",))
            retried += tokens
            if token or len(rows) < PURGE_BATCH:
                return retried
            after = rows[-1][0]

    def cancel_jobs(self, statuses=(QUEUED, RUNNING), queue=None):
        canceled = []
        while True:
            with self._transaction(self.timeout) as conn:
                rows = conn.execute(self.CANCEL_JOBS, {
                    "statuses": list(statuses), "queue": queue, "limit": PURGE_BATCH}).fetchall()
                self._count(conn, finished_canceled=len(rows),
                            queued=-sum(status == QUEUED for _, status in rows))
                if any(status == RUNNING for _, status in rows):
                    conn.execute(self.NOTIFY, ("canceled",))
            canceled += [tuple(row) for row in rows]
            if len(rows) < PURGE_BATCH:
                return canceled

    def release(self, owner):
        with self._transaction() as conn:
            rows = conn.execute(self.RELEASE, (owner,)).fetchall()
            self._count(conn, queued=len(rows))
            if rows:
                conn.execute(self.NOTIFY, (f"submitted:{len(rows)}",))
        return [token for (token,) in rows]

    def running_owners(self):
        return [owner for (owner,) in self._read(self.RUNNING_OWNERS)]

    def recover(self, max_attempts, lost_owners=()):
        params = {"lost": list(lost_owners), "most": max_attempts}
        if not self._read(self.ANY_LOST, params):
            return []
        with self._transaction() as conn:
            rows = conn.execute(self.RECOVER, params).fetchall()
            failed = sum(status == FAILED for _, status in rows)
            self._count(conn, finished_failed=failed, queued=len(rows) - failed)
            if len(rows) > failed:
                conn.execute(self.NOTIFY, (f"submitted:{len(rows) - failed}",))
        return rows

    def purge(self, retention, batch=PURGE_BATCH):
        with self._transaction() as conn:
            return (conn.execute(self.PURGE_JOBS, (retention, batch)).rowcount
                    + conn.execute(self.PURGE_BATCHES, (retention, batch)).rowcount)

    def maintain(self):
        """Refresh the planner's statistics of the jobs table; prune the starts no
        rate window counts and the processes gone an hour."""
        self._write(self.ANALYZE)
        self._write(self.PRUNE_STARTS)
        self._write(self.PURGE_PROCESSES, (GONE_KEPT,))

    def expire(self):
        if not self._read(self.ANY_EXPIRED):
            return []
        return [token for (token,) in self._write(self.EXPIRE)]

    def put_schedule(self, name, schedule):
        with self._transaction(self.timeout) as conn:
            ((now,),) = conn.execute(self.NOW).fetchall()
            before = _schedule(conn.execute(self.LOCK_SCHEDULE, (name,)).fetchone())
            after = _schedule(conn.execute(self.PUT_SCHEDULE, {
                **schedule, "name": name, "job": json.dumps(schedule["job"]),
                "every": None if schedule["every"] is None else float(schedule["every"]),
                "next_run_at": _next_run_at(before, schedule, now)}).fetchone())
        return after, before is None

    def schedule(self, name):
        return _schedule(next(iter(self._read(self.GET_SCHEDULE, (name,))), None))

    def schedules(self):
        return [_schedule(row) for row in self._read(self.LIST_SCHEDULES)]

    def delete_schedule(self, name):
        with self._transaction(self.timeout) as conn:
            return _schedule(conn.execute(self.DELETE_SCHEDULE, (name,)).fetchone())

    def next_schedule(self):
        ((seconds,),) = self._read(self.NEXT_SCHEDULE)
        return None if seconds is None else max(0.0, seconds)

    def fire_schedules(self, retries=0):
        if self.next_schedule() != 0:
            return []  # the usual case: one cheap read
        with self._transaction() as conn:
            rows = conn.execute(self.DUE_SCHEDULES, {"limit": FIRE_BATCH}).fetchall()
            if not rows:
                return []  # another process holds them
            now = rows[0][-1]
            fired = _fired([_schedule(row[:-1]) for row in rows], now, retries)
            jobs, duplicates = self._sort_out(conn, [job for _, _, job in fired])
            self._insert(conn, jobs, scheduled=True)
            conn.execute(self.SCHEDULE_FIRED, {
                "names": [schedule["name"] for schedule, _, _ in fired],
                "nexts": [float(next_slot(schedule, now)) for schedule, _, _ in fired],
                "slots": [float(slot) for _, slot, _ in fired],
                "jobs": [duplicates[n][0] if n in duplicates else job.token
                         for n, (_, _, job) in enumerate(fired)]})
            self._count(conn, submitted=len(jobs), queued=len(jobs), duplicate=len(duplicates))
        return [job.token for job in jobs]

    def queues(self, name=None):
        return _queue_views(self._read(self.LIST_QUEUES, {"name": name}),
                            self._read(self.QUEUE_COUNTS, {"name": name}))

    def set_queue(self, name, change):
        with self._transaction(self.timeout) as conn:
            conn.execute(self.NAME_QUEUE, (name,))
            before = _queue(conn.execute(self.LOCK_QUEUE, (name,)).fetchone())
            conn.execute(self.PUT_QUEUE, _queue_params(name, change(before)))
            conn.execute(self.NOTIFY, ("queues:0",))

    def queue_limits(self):
        return {row[0]: _queue(row) for row in self._read(self.QUEUE_LIMITS)}

    def register(self, process):
        self._write(self.REGISTER, _process_params(process))

    def heartbeat(self, process_id, workers):
        return bool(self._write(self.HEARTBEAT, (workers, process_id)))

    def unregister(self, process_id):
        self._write(self.UNREGISTER, (process_id,))

    def processes(self):
        return _fleet(self._read(self.LIST_PROCESSES, (ALIVE_WITHIN,)), self._read(self.BUSY))

    def listen(self, most):
        """LISTEN on a dedicated connection (to listen_url when given), woken by the
        NOTIFY that submits, cancels and requeues send inside their transactions.
        Through a transaction-mode pool without listen_url a LISTEN would be lost
        with its server session: none is made, and the poll is the only wake-up."""
        if self.pooled and self.listen_url is None:
            log.warning("no LISTEN through a transaction-mode pool: jobs queued by other"
                        " processes wait for the poll (once a second); set listen_db to a"
                        " direct URL or a session-mode pool")
            return _NoListener()
        return _PostgresListener(self, most)


class _PostgresListener(Listener):
    def __init__(self, store, most):
        self._store, self._most, self._conn = store, most, None

    def wait(self, timeout):
        store = self._store
        try:
            with store._errors():
                if self._conn is None:
                    self._conn = store._connect(store.listen_url)
                    self._conn.execute(store.LISTEN)
                    return 1, True  # notifications may have been missed meanwhile
                waiting, canceled = 0, False
                # One packet may carry several notifications; all are taken.
                for notice in list(self._conn.notifies(timeout=timeout, stop_after=1)):
                    kind, _, count = notice.payload.partition(":")
                    waiting += int(count) if kind == "submitted" else 0
                    canceled = canceled or kind in ("canceled", "queues")
                return min(waiting, self._most), canceled
        except StoreError:
            self.close()
            raise

    def close(self):
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


# -- Workers -----------------------------------------------------------------

MAX_BACKOFF = 3600.0  # the longest wait before a retry that the backoff computes


class Retry(Exception):
    """Raised by a processor: run this job again in `delay` seconds.

    It counts as one of the job's retries; with none left the job fails with
    this exception's message. Without a delay, the usual backoff applies.
    """

    def __init__(self, delay=None, message="the processor asked for a retry"):
        super().__init__(message)
        if delay is not None and not (isinstance(delay, (int, float)) and delay >= 0
                                      and math.isfinite(delay)):
            raise ValueError(f"delay must be a number of seconds >= 0, not {delay!r}")
        self.delay = delay


class Histograms:
    """Prometheus histograms of one process, by their labels' values; the caller
    holds a lock. Buckets from a millisecond to a day: the same for a job that
    sleeps 2 ms and one that runs for hours, or waits days for its delay."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)

    def __init__(self):
        self.series = {}  # label values -> [count in each bucket (not cumulative), +Inf, sum]

    def observe(self, labels, value):
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.BUCKETS) + 1) + [0.0]
        series[bisect.bisect_left(self.BUCKETS, value)] += 1
        series[-1] += value

    def copy(self):
        copied = Histograms()
        copied.series = {labels: list(series) for labels, series in self.series.items()}
        return copied

    def samples(self, name, label_names):
        """The text format's sample lines: cumulative buckets, _sum and _count."""
        lines = []
        for values, series in sorted(self.series.items()):
            labels = ",".join(f'{label}="{value}"' for label, value in zip(
                label_names, values, strict=True))
            total = 0
            for bound, count in zip((*self.BUCKETS, "+Inf"), series, strict=False):
                total += count
                le = bound if bound == "+Inf" else repr(bound)
                lines.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
            lines += [f"{name}_sum{{{labels}}} {series[-1]!r}",
                      f"{name}_count{{{labels}}} {total}"]
        return lines


class Job:
    """What a processor receives: one running job.

    `canceled` is an Event set when the job is canceled, passes its `timeout` or
    the service shuts down; a long processor should wait on it or poll it.
    """

    def __init__(self, runner, row):
        self._runner = runner
        self.token, self.item, self.valor = row["token"], row["item"], row["valor"]
        self.attempts, self.queue, self.priority = row["attempts"], row["queue"], row["priority"]
        self._retries, self._retried = row["retries"], row["retried"]  # limit, made
        self.timeout = row["timeout"] or runner.timeout  # seconds, or None
        self.canceled = threading.Event()
        self._thread = threading.current_thread()  # the worker running it
        self.deadline = None  # monotonic time its run must end by (the timer's)
        self._timed_out = False  # set by the timer, under the runner's lock
        self._cut = False  # its run stopped without an outcome: a shutdown, a lost lease
        self._outcome = None  # ("done" | "error" | "canceled", seconds) once it ended

    def set_progress(self, fraction):
        """Report progress from 0 to 1; shown by GET /check while the job runs."""
        fraction = float(fraction)
        if not math.isfinite(fraction):
            raise ValueError(f"progress must be a finite number, not {fraction!r}")
        self._runner.store.set_progress(self.token, self._runner.owner, self.attempts,
                                        min(1.0, max(0.0, fraction)))

    def __repr__(self):
        return f"<Job {self.token} item={self.item!r} valor={self.valor!r}>"


def wait_valor(job):
    """The default processor: wait `valor` seconds, or less if canceled."""
    job.canceled.wait(job.valor)


class _Claim:
    """A worker's wait for a job: the committer's next transaction claims it one."""

    __slots__ = ("done", "error", "row")

    def __init__(self):
        self.done = threading.Event()
        self.row, self.error = None, None


class Runner:
    """The threads of one process: workers that claim and run jobs; a housekeeper that
    renews leases, recovers lost jobs and purges; a clock that makes the jobs of
    due schedule slots (every process has one: the store decides which makes each
    slot's job), expires the jobs that could not start in time and reads the
    queues' limits; a timer that ends the runs that pass their timeout.

    A run past its timeout ends as an error at once, and its worker thread is
    abandoned (Python cannot stop a thread): a new one takes its place, and what
    the old one's processor returns later is dropped. With `restart_stuck` (a
    child of `worker --processes`) a processor still running `grace` seconds after
    its timeout ends the whole process, which its supervisor starts again.

    Holds a token -> Event map of the jobs running here; the Event is set when
    the job ends, and the entry is dropped.
    """

    poll_interval = 1.0  # the fallback look for jobs queued by other processes
    clock_interval = 0.5  # the longest the clock sleeps: expiry is within a second
    purge_interval = 60.0
    listen_timeout = 0.5  # longest a listener blocks, so it sees a stop soon
    commit_window = 0.002  # longest the committer waits for running jobs to end
    prefetch = 8  # most jobs claimed ahead per worker, when jobs end within the window
    hold_ahead = 0.05  # longest a job claimed ahead waits for a worker here
    stop_wait = 5.0  # longest stop() waits for a transaction under way before releasing

    def __init__(self, store, process=wait_valor, workers=16, lease=30.0, max_attempts=3,
                 retention=7 * 86400.0, grace=10.0, queues=None, retry_delay=1.0,
                 max_delay=30 * 86400.0, retries=0, timeout=None, restart_stuck=False,
                 http=False):
        self.store, self.process = store, process
        self.http = http  # what it tells the fleet: this process serves HTTP
        self.timeout, self.restart_stuck = timeout, restart_stuck  # timeout: None, no limit
        self.workers, self.lease, self.max_attempts = workers, lease, max_attempts
        self.retention, self.grace = retention, grace
        self.queues = tuple(queues) if queues else None  # None: every queue
        self.retry_delay, self.max_delay = retry_delay, max_delay
        self.retries = retries  # of a scheduled job whose item sets none
        self._after_fork()
        _fork_sensitive.add(self)

    def _after_fork(self):
        # In a forked child the parent's threads are gone: start afresh.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # idle workers wait here
        self._committer_wake = threading.Condition(self._lock)  # the committer waits here
        self._stopping = threading.Event()
        self._grace_over = threading.Event()  # stop() gave running jobs their grace
        self._rescheduled = threading.Event()  # a schedule changed here, or stop()
        self.owner = None      # this process's name in the store, set by start()
        # Guarded by self._lock. Read without it: _pid by start() (then again with it),
        # _store_down by the workers (a stale value only delays a log line).
        self._pid = None       # the process whose threads these are
        self._threads = []
        self._committer = None
        # token -> [Job, Event set when it ends, made by the first waiter (_wait)]; a run
        # that ended stays until the committer has recorded its end.
        self._live = {}
        self._wakeups = 0      # jobs announced that no idle worker has looked for yet
        self._store_down = False  # claims are failing: an outage is being logged
        self._claims = []      # _Claim requests waiting for the committer
        self._ends = []        # (finish, live entry, seconds run): ends not yet recorded
        # Jobs claimed ahead for the next free workers: (row, when it goes back to the
        # queue if no worker took it, in monotonic time).
        self._ready = collections.deque()
        self._drained = False  # the last claim found fewer jobs than it asked for
        self._committer_idle = False  # it waits for any request: the first end wakes it
        self._committing = False  # the committer takes requests (until stop() ends it)
        self._working = 0      # worker threads not yet ended
        self._busy = 0         # jobs claimed here whose run has not ended (_run settles it)
        self._typical = 1.0    # seconds a job runs here: a moving average
        # The queues paused or limited, as last read from the store (replaced whole,
        # read without the lock): a claim passes them on; the store enforces them.
        self._limits = {}
        # The timer's: a live run's deadline is its Job's; an abandoned run's processor
        # should have returned by then (monotonic time; Job -> time).
        self._stuck_at = {}
        self._timer_wake = threading.Condition(self._lock)  # a run with a deadline began
        self._abandoned = set()  # worker threads whose run timed out and went on
        # This process's runs for /metrics, by (queue,) and by (queue, outcome); guarded.
        self.wait_seconds, self.run_seconds = Histograms(), Histograms()
        self._polling = False  # an idle worker looks again at a full queue (LIMIT_POLL)
        self._handoff = False  # the looking worker found a job: another takes over

    # Starting and stopping.

    def start(self):
        """Start the threads in this process, once; a forked child starts its own."""
        if self._pid == os.getpid():  # the common case, without taking the lock
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
            stopping = self._stopping
            threads = [threading.Thread(target=self._work, args=(stopping,),
                                        name=f"queue_tool-worker-{n}", daemon=True)
                       for n in range(self.workers)]
            if self.workers:
                self._committer = threading.Thread(target=self._commit_loop,
                                                   name="queue_tool-committer", daemon=True)
                threads.append(self._committer)
            self._working, self._committing = self.workers, bool(self.workers)
            threads.append(threading.Thread(target=self._housekeep, args=(stopping,),
                                            name="queue_tool-housekeeper", daemon=True))
            threads.append(threading.Thread(target=self._clock, args=(stopping,),
                                            name="queue_tool-clock", daemon=True))
            if self.workers:
                threads.append(threading.Thread(target=self._listen, args=(stopping,),
                                                name="queue_tool-listener", daemon=True))
                threads.append(threading.Thread(target=self._timer, name="queue_tool-timer",
                                                daemon=True))
            self._threads = threads
        try:
            self.store.register(self._record())
            self._recover()
            self.refresh_limits()
        except StoreError as exc:  # an outage: the housekeeper and the clock try again
            log.error("recovering lost jobs failed: %s", exc)
        for thread in threads:
            thread.start()

    def _record(self):
        """This process as the fleet lists it (PROCESS_RECORD)."""
        return {"id": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "version": __version__, "http": self.http, "workers": self.workers,
                "queues": self.queues}

    def _heartbeat(self):
        """Refresh this process's record; make it again if it is gone (an outage at
        start, or a purge that a skewed clock brought early)."""
        if not self.store.heartbeat(self.owner, self.alive_workers()) \
                and not self._stopping.is_set():  # stop() marked it stopped: it stays so
            self.store.register(self._record())

    def stop(self, grace=None):
        """Stop claiming, give running jobs `grace` seconds, requeue the rest.

        Returns the tokens put back in the queue.
        """
        grace = self.grace if grace is None else grace
        with self._lock:
            if self._pid != os.getpid() or self._stopping.is_set():
                return []
            self._stopping.set()
            self._rescheduled.set()
            self._wake.notify_all()
            threads = [thread for thread in self._threads if thread is not self._committer
                       and thread.name != "queue_tool-timer" and thread not in self._abandoned]
        try:
            return self._wind_down(threads, grace)
        finally:
            try:
                self.store.unregister(self.owner)
            except StoreError as exc:  # its heartbeat stops: gone in ALIVE_WITHIN seconds
                log.warning("could not record this process as stopped: %s", exc)

    def _wind_down(self, threads, grace):
        """stop()'s work once the threads were told: grace, then the release."""
        deadline = time.monotonic() + grace
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._grace_over.set()
        with self._lock:
            self._timer_wake.notify()
            live = list(self._live.values())
        for job, _ in live:
            job._cut = True  # put back in the queue, not ended: no outcome of its own
            job.canceled.set()  # the default processor returns at once
        if not self._stop_committer():
            log.error("a claim or an end was still being recorded after %gs; running jobs"
                      " come back when their leases run out", self.stop_wait)
            return []
        try:
            requeued = self.store.release(self.owner)
        except StoreError as exc:
            # Not lost: their leases run out and the next start takes them back.
            log.error("could not put running jobs back in the queue: %s", exc)
            return []
        for token in requeued:
            log.info("job %s requeued at shutdown", token, extra={"token": token})
        return requeued

    def _stop_committer(self):
        """End the committer once it has recorded what it was asked: True when it has.

        Only then may stop() put running jobs back: a claim still under way would
        otherwise take a job after the release, and hold it until its lease ran out.
        """
        with self._lock:
            committer, self._committing = self._committer, False
            self._committer_wake.notify()
        if committer is not None:
            committer.join(self.stop_wait)
        return committer is None or not committer.is_alive()

    # Telling workers and waiters.

    def notify_submitted(self, count):
        """Wake up to `count` idle workers: jobs were just queued here."""
        with self._lock:
            # One wake-up per job, kept for a worker that is between a claim that
            # found nothing and its sleep: then no wake-up is missed, and one submit
            # sends one worker looking, not every worker that was busy at the time.
            self._wakeups = min(self._wakeups + count, self.workers)
            self._drained = False
            self._wake.notify(count)

    def set_queue(self, name, change):
        """Change a queue's settings (see Store.set_queue); this process obeys them
        at once, the others within a second."""
        self.store.set_queue(name, change)
        self.refresh_limits()

    def refresh_limits(self):
        """Read the queues' limits again; wake idle workers if they changed (a
        queue resumed, say)."""
        limits = self.store.queue_limits()
        if limits != self._limits:
            self._limits = limits
            self.notify_submitted(self.workers)

    def schedules_changed(self):
        """A schedule was put or deleted here: the clock looks again at once."""
        self._rescheduled.set()

    def cancel(self, token):
        """Cancel a queued or running job (see Store.cancel) and stop it if it runs
        here; a process elsewhere hears of it from the store."""
        outcome = self.store.cancel(token)
        if outcome is not None and outcome[0]["status"] not in FINAL_STATES:
            if outcome[0]["status"] == RUNNING:
                self.cancel_local(token)
            log.info("job %s canceled", token, extra={"token": token, "status": CANCELED})
        return outcome

    def cancel_batch(self, batch_id):
        """Cancel a batch's unfinished jobs (see Store.cancel_batch), as cancel() does."""
        canceled = self.store.cancel_batch(batch_id)
        if canceled is not None:
            for token, status in canceled:
                if status == RUNNING:
                    self.cancel_local(token)
            log.info("batch %s canceled: %d unfinished jobs", batch_id, len(canceled))
        return canceled

    def retry_jobs(self, statuses=(FAILED, CANCELED), queue=None, token=None):
        """Put failed or canceled jobs back in the queue (see Store.retry_jobs) and
        wake idle workers for them."""
        retried = self.store.retry_jobs(statuses, queue, token)
        if retried:
            self.notify_submitted(len(retried))
            log.info("%d jobs retried by hand", len(retried))
        return retried

    def cancel_jobs(self, statuses=(QUEUED, RUNNING), queue=None):
        """Cancel queued or running jobs (see Store.cancel_jobs), as cancel() does."""
        canceled = self.store.cancel_jobs(statuses, queue)
        for token, status in canceled:
            if status == RUNNING:
                self.cancel_local(token)
        if canceled:
            log.info("%d jobs canceled by hand", len(canceled))
        return canceled

    def cancel_local(self, token, attempt=None):
        """Tell a job running here (that run of it, if `attempt` is given) that it
        was canceled; False if not here.

        The job is over for its waiters even if the processor ignores the cancel
        event and runs on: they are woken, and the entry is dropped at once.
        """
        with self._lock:
            entry = self._live.get(token)
            if entry is None or attempt not in (None, entry[0].attempts):
                # Claimed ahead and not started: dropped, as if it had never been.
                ahead = [held for held in self._ready if held[0]["token"] == token
                         and attempt in (None, held[0]["attempts"])]
                for held in ahead:
                    self._ready.remove(held)
                    self._busy -= 1
                return bool(ahead)
            del self._live[token]
        job, ended = entry
        job.canceled.set()
        if ended is not None:
            ended.set()
        return True

    def wait_for(self, token, timeout):
        """The job's row once it is final or `timeout` seconds pass (None if unknown)."""
        return self._wait(lambda: self.store.get(token), timeout,
                          lambda row: [] if row["status"] in FINAL_STATES else [token])

    def wait_for_batch(self, batch_id, timeout):
        """The batch once all its jobs are final or `timeout` seconds pass (None if
        unknown)."""
        return self._wait(lambda: self.store.batch(batch_id), timeout, lambda batch: [
            job["token"] for job in batch["jobs"] if job["status"] not in FINAL_STATES])

    def _wait(self, read, timeout, unfinished):
        """read() until unfinished(value) is empty or `timeout` seconds pass.

        While a job it waits for runs here, it waits on that job's Event; otherwise
        it polls the store, briefly at first, then up to every 0.25 s.
        """
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            value = read()
            remaining = deadline - time.monotonic()
            pending = [] if value is None else unfinished(value)
            if not pending or remaining <= 0:
                return value
            with self._lock:
                entry = next((self._live[t] for t in pending if t in self._live), None)
                if entry is not None and entry[1] is None:
                    entry[1] = threading.Event()
            if entry is not None:
                # Bounded: another process may end it (a cancel, a lost lease).
                entry[1].wait(min(remaining, 1.0))
            else:
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.25)

    def histograms(self):
        """Copies of this process's (wait_seconds, run_seconds)."""
        with self._lock:
            return self.wait_seconds.copy(), self.run_seconds.copy()

    def alive_workers(self):
        """Worker threads running in this process now."""
        with self._lock:
            threads = self._threads if self._pid == os.getpid() else []
            return sum(t.is_alive() for t in threads if t.name.startswith("queue_tool-worker")
                       and t not in self._abandoned)

    # The threads.

    def _work(self, stopping):
        try:
            self._claim_and_run(stopping)
        except SystemExit as exc:  # raised by a processor: not an Exception, so it ends here
            log.error("%s ended: %r", threading.current_thread().name, exc)
        finally:
            with self._lock:
                if threading.current_thread() in self._abandoned:  # its place is taken
                    self._abandoned.discard(threading.current_thread())
                else:
                    self._working -= 1
                self._committer_wake.notify()  # one worker fewer for the commit window

    def _claim_and_run(self, stopping):
        row = None  # a job claimed ahead, to run next
        polled = False  # this worker just looked for room in a full queue
        while True:
            if row is None and stopping.is_set():
                # Jobs claimed ahead are claimed: they run in the grace, as one
                # claimed with a run's end does. Nothing more is claimed.
                with self._lock:
                    row = self._ready.popleft()[0] if self._ready else None
                if row is None:
                    break
            if row is None:
                try:
                    row = self._claim()
                    if polled and row is not None:  # off to run it: another looks next
                        with self._lock:
                            self._handoff = True
                            self._wake.notify()
                    polled = False
                    due = None if row else self.store.next_due(self.queues, self._limits)
                except StoreError as exc:
                    if stopping.is_set():
                        break
                    self._store_failed(exc)
                    stopping.wait(self.poll_interval)
                    continue
                if self._store_down:
                    self._store_back()
                if row is None:
                    # Sleep until a submit here or the listener wakes us, or until the
                    # next delayed job is due; then look again, taking one wake-up. A
                    # queue at its concurrency (due is LIMIT_POLL) is looked at by one
                    # idle worker at a time: more would only slow every claim down.
                    with self._lock:
                        polled = due == LIMIT_POLL and not self._polling
                        if not self._wakeups and not self._ready and not stopping.is_set():
                            self._polling |= polled
                            self._wake.wait(None if due is None or (
                                due == LIMIT_POLL and not polled) else max(due, 0.002))
                            if self._handoff and not (self._polling or self._wakeups):
                                # Woken to take the looking over: it looks in LIMIT_POLL.
                                self._handoff, self._polling = False, True
                                polled = True
                                self._wake.wait(LIMIT_POLL)
                        if polled:
                            self._polling = False
                        self._wakeups = max(self._wakeups - 1, 0)
                    continue
            row = self._run(row)
            if threading.current_thread() in self._abandoned:
                return

    def _claim(self):
        """A job's row for this worker: one claimed ahead, else one claimed in the
        committer's next transaction (None when none is ready)."""
        request = _Claim()
        with self._lock:
            if self._ready:
                return self._ready.popleft()[0]
            if not self._committing:
                raise StoreError("the workers are stopping: nothing more is recorded")
            self._claims.append(request)
            self._committer_wake.notify()
        request.done.wait()  # the committer answers every request it was given
        if request.error is not None:
            raise request.error
        return request.row

    def _record_end(self, finish, entry, ran):
        """Hand a run's end (token, attempt, status, result, error) to the committer,
        which records it in its next transaction with the other ends and claims; the
        worker goes on at once. The caller holds the lock."""
        self._ends.append((finish, entry, ran))
        self._typical += (ran - self._typical) / 16
        if self._committer_idle or self._busy <= len(self._ready):
            self._committer_wake.notify()  # else the committer's window ends soon anyway

    def _commit_loop(self):
        """The committer thread: one transaction for every end and claim waiting, until
        stop() ends it. Every claim it takes gets an answer, an error if anything
        failed (a job whose end was not recorded then comes back by its lease, as
        after any failed commit), so no worker can wait for ever; the thread itself
        goes on."""
        try:
            while (batch := self._next_commits()) is not None:
                claims, ends, ahead, back = batch
                error = StoreError("the committer stopped")
                finished = set()
                try:
                    if back:  # if this fails, their leases run out as after a crash
                        self.store.unclaim(self.owner, back)
                    finished, rows = self.store.finish_and_claim(
                        self.owner, [finish for finish, _, _ in ends], len(claims) + ahead,
                        self.lease, self.queues, self._limits)
                    self._hand_out(claims, len(claims) + ahead, rows)
                except StoreError as exc:
                    error = exc
                except Exception as exc:  # logged; every waiter hears of it
                    log.exception("recording ends and claims failed")
                    error = StoreError(f"{type(exc).__name__}: {exc}")
                finally:
                    for request in claims:
                        if not request.done.is_set():
                            request.row, request.error = None, error
                            request.done.set()
                    self._ended(ends, finished, error)
        except BaseException:
            log.critical("the committer died: this process claims and records no more jobs",
                         exc_info=True)
            raise
        finally:
            with self._lock:
                self._committing = False
                left, self._claims = self._claims, []
                ends, self._ends = self._ends, []
            for request in left:
                request.error = StoreError("the committer stopped")
                request.done.set()
            self._ended(ends, set(), StoreError("the committer stopped"))

    def _next_commits(self):
        """The next transaction's (claims, ends, jobs to claim ahead, {token: attempt}
        of jobs claimed ahead to put back), or None once stop() ended the committer
        and nothing is left.

        A short group-commit window: when jobs here take less than the window,
        those still running will end within moments, and a transaction costs
        nearly the same for 16 ends as for 8. An idle service (nothing running) or
        one of longer jobs commits at once. Jobs that short are also claimed ahead,
        as many as this process ends in a window (at most `prefetch` per worker),
        so a worker that ends one starts the next without waiting for a commit.
        Longer jobs are not claimed ahead; and one claimed ahead that no worker
        took within `hold_ahead` goes back to the queue for other processes.
        """
        with self._lock:
            while not self._claims and not self._ends:
                if not self._committing:
                    return None
                if self._ready and self._ready[0][1] <= time.monotonic():
                    break  # jobs claimed ahead waited too long: they go back
                self._committer_idle = True
                self._committer_wake.wait(
                    self._ready[0][1] - time.monotonic() if self._ready else None)
            self._committer_idle = False
            deadline = time.monotonic() + self.commit_window
            # While jobs still run here (those claimed ahead are busy, not running).
            while (self._typical < self.commit_window and len(self._claims) < self._working
                   and self._busy > len(self._ready)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._committer_wake.wait(remaining)
            claims, self._claims = self._claims, []
            ends, self._ends = self._ends, []
            now, back = time.monotonic(), {}
            while self._ready and self._ready[0][1] <= now:
                # Jobs run here longer than the window now: those claimed ahead would
                # wait for one to end, so other processes take them instead, and no
                # more are claimed ahead until runs are short again.
                row, _ = self._ready.popleft()
                back[row["token"]] = row["attempts"]
                self._busy -= 1
                self._typical = max(self._typical, self.commit_window)
            ahead = 0
            if self._typical < self.commit_window and not self._drained \
                    and not self._stopping.is_set():
                ahead = min(self.prefetch * self.workers,
                            int(self.workers * self.commit_window / max(self._typical, 1e-6)))
                ahead = max(0, ahead - len(self._ready))
        return claims, ends, ahead, back

    def _hand_out(self, claims, asked, rows):
        """Give each waiting worker a row, in priority order; keep the rest ahead."""
        for request, row in zip(claims, rows, strict=False):  # never more rows than asked
            request.row = row
        with self._lock:
            self._busy += len(rows)  # before any of them can end
            self._drained = len(rows) < asked
            ahead = rows[len(claims):]
            if ahead:
                back_at = time.monotonic() + self.hold_ahead
                self._ready.extend((row, back_at) for row in ahead)
                self._wakeups = min(self._wakeups + len(ahead), self.workers)
                self._wake.notify(len(ahead))  # an idle worker takes one
        for request in claims:
            request.done.set()

    def _ended(self, ends, finished, error):
        """After the transaction that recorded them (or failed to): the ends' waiters
        are woken, their entries dropped, and each end is logged."""
        with self._lock:
            waiters = []
            for (token, _, _, _, _), entry, _ in ends:
                if self._live.get(token) is entry:
                    del self._live[token]
                if entry[1] is not None:
                    waiters.append(entry[1])
        for ended in waiters:
            ended.set()
        for (token, attempt, status, _, _), _, ran in ends:
            if token not in finished:
                # The lease runs out and another worker takes it again: at-least-once.
                if error is not None and not self._stopping.is_set():
                    log.error("recording job %s as %s failed: %s", token, status, error)
                continue
            # A job done is a debug line: at info, two lines a job cost half the
            # throughput of a busy service (measured); what went wrong stays info.
            level = logging.DEBUG if status == DONE else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "job %s %s in %.3fs", token, status, ran, extra={
                    "token": token, "attempt": attempt, "status": status,
                    "duration_ms": round(ran * 1e3, 3)})

    def _store_failed(self, exc):
        """Log an outage once, not once a second for every worker."""
        with self._lock:
            first, self._store_down = not self._store_down, True
        if first:
            log.error("claiming jobs failed; workers retry every %gs: %s",
                      self.poll_interval, exc)

    def _store_back(self):
        with self._lock:
            was, self._store_down = self._store_down, False
        if was:
            log.info("claiming jobs works again")

    def _run(self, row):
        """Run one claimed job, holding it in the live map while it runs; the row
        of the next job, claimed ahead, or None.

        Every job claimed here ends here, once, whatever happens: the one place the
        busy count goes down. A job claimed while the workers stop still runs, in
        the grace stop() gives every running job (the store shows it running); one
        claimed after the grace is not run: stop() puts it back in the queue.
        """
        job = Job(self, row)
        entry = [job, None]
        with self._lock:
            # An older run of this job here lost its lease (an outage, say), and the
            # job was claimed again: the old run holds it no more, so it is told to stop.
            displaced = self._live.get(job.token)
            self._live[job.token] = entry
            self.wait_seconds.observe((job.queue,), max(0.0, row["started_at"] - row["run_at"]))
            if job.timeout:
                job.deadline = time.monotonic() + job.timeout
                self._timer_wake.notify()
        if displaced is not None:
            displaced[0]._cut = True
            displaced[0].canceled.set()
        end = None
        try:
            end = None if self._grace_over.is_set() else self._execute(job)
        finally:  # whatever the processor raised: a job not live here is not renewed
            with self._lock:
                job.deadline = None  # ended: nothing for the timer
                if not job._timed_out:  # else the timer settled it
                    self._busy -= 1
                if job._outcome is not None:
                    self.run_seconds.observe((job.queue, job._outcome[0]), job._outcome[1])
                if end is not None and self._live.get(job.token) is entry:
                    self._record_end(end[0], entry, end[1])  # the committer drops the entry
                else:
                    end = None
                    if self._live.get(job.token) is entry:  # not dropped by a cancel
                        del self._live[job.token]
                    self._committer_wake.notify()  # one job fewer for its window
                row = self._ready.popleft()[0] if end is not None and self._ready else None
            if end is None and entry[1] is not None:
                entry[1].set()
        return row

    def _execute(self, job):
        """Run the processor: (finish, seconds) for the committer to record, or None
        (a retry recorded here, a cancel, a timeout, a shutdown)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s running (attempt %d)", job.token, job.attempts,
                      extra={"token": job.token, "attempt": job.attempts, "queue": job.queue})
        started = time.monotonic()
        delay = None
        try:
            status, result, error = DONE, self._call_process(job), None
        except Retry as exc:
            status, result, error, delay = FAILED, None, str(exc), exc.delay
        except Exception as exc:
            log.warning("job %s failed", job.token, exc_info=True,
                        extra={"token": job.token, "attempt": job.attempts})
            status, result, error = FAILED, None, str(exc) or type(exc).__name__
        ran = time.monotonic() - started
        if job.canceled.is_set():
            # Canceled (already final in the store), timed out (ended by the timer)
            # or cut short by a shutdown, which puts it back in the queue: either
            # way it does not end here.
            if not (job._timed_out or job._cut):
                job._outcome = ("canceled", ran)
            return None
        job._outcome = ("done" if status == DONE else "error", ran)
        if status == FAILED and job._retried < job._retries:
            self._retry(job, error, delay)
            return None
        return (job.token, job.attempts, status, result, error), ran

    def _retry(self, job, error, delay):
        """A failure with retries left goes back to the queue, in `delay` seconds or
        the backoff's."""
        delay = self.backoff(job._retried + 1) if delay is None else delay
        try:
            if self.store.retry(job.token, self.owner, job.attempts, error,
                                min(delay, self.max_delay)):
                log.info("job %s failed (attempt %d); retry %d of %d in %.3fs", job.token,
                         job.attempts, job._retried + 1, job._retries, delay,
                         extra={"token": job.token, "attempt": job.attempts,
                                "status": QUEUED})
        except StoreError as exc:
            # The lease runs out and another worker takes it again: at-least-once.
            if not self._stopping.is_set():
                log.error("recording job %s as %s failed: %s", job.token, FAILED, exc)

    def _timer(self):
        """The timer thread: ends each run that passes its timeout, until the
        workers' grace is over. It looks only at the runs live here (at most
        `workers`) and the abandoned ones, so nothing it keeps grows with the jobs."""
        while True:
            with self._lock:
                while True:
                    if self._grace_over.is_set():
                        return
                    now = time.monotonic()
                    late = [entry for entry in self._live.values()
                            if entry[0].deadline is not None and entry[0].deadline <= now]
                    stuck = [job for job, at in self._stuck_at.items() if at <= now]
                    if late or stuck:
                        break
                    soonest = min([entry[0].deadline for entry in self._live.values()
                                   if entry[0].deadline is not None]
                                  + list(self._stuck_at.values()), default=None)
                    self._timer_wake.wait(None if soonest is None else soonest - now)
                workers = []
                for job, _ in late:
                    del self._live[job.token]  # over for its waiters and the lease renewals
                    job._timed_out = True
                    self._busy -= 1
                    self.run_seconds.observe((job.queue, "error"), job.timeout)
                    self._abandoned.add(job._thread)
                    self._stuck_at[job] = now + self.grace
                    workers.append(threading.Thread(
                        target=self._work, args=(self._stopping,),
                        name=f"{job._thread.name}+", daemon=True))
                self._threads += workers
                for job in stuck:
                    del self._stuck_at[job]
                stuck = [job for job in stuck if job._thread in self._abandoned]
            for entry, worker in zip(late, workers, strict=True):
                self._time_out(entry[0], entry, worker)
            for job in stuck:
                if job._thread.is_alive():
                    self._stuck(job)

    def _time_out(self, job, entry, worker):
        job.canceled.set()
        worker.start()
        error = f"timed out after {job.timeout:g} s"
        log.warning("job %s %s (attempt %d); a new worker takes its thread's place",
                    job.token, error, job.attempts,
                    extra={"token": job.token, "attempt": job.attempts})
        if job._retried < job._retries:
            self._retry(job, error, None)
            if entry[1] is not None:
                entry[1].set()
            return
        with self._lock:  # its waiters are woken once the end is recorded
            self._record_end((job.token, job.attempts, FAILED, None, error), entry, job.timeout)

    def _stuck(self, job):
        if self.restart_stuck:
            log.error("job %s still runs %gs after its timeout: this process ends, and its"
                      " supervisor starts another", job.token, self.grace)
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            log.warning("job %s still runs %gs after its timeout, in an abandoned thread"
                        " (worker --processes restarts a process instead)", job.token,
                        self.grace)

    def backoff(self, retry):
        """Seconds before the n-th retry: retry_delay x 2^(n-1), at most an hour,
        with 10% jitter either way so that jobs failing together spread out."""
        delay = min(self.retry_delay * 2 ** (retry - 1), MAX_BACKOFF)
        return delay * random.uniform(0.9, 1.1)

    def _call_process(self, job):
        """Run the processor; its JSON-serialisable return value, as JSON text."""
        value = self.process(job)
        if value is None:
            return None
        try:
            return json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError):
            log.warning("job %s returned %s, which is not JSON; no result is kept",
                        job.token, type(value).__name__)
            return None

    def _housekeep(self, stopping):
        """Wake workers for jobs queued elsewhere, renew leases, notice remote
        cancels, recover lost jobs, purge old ones."""
        tick = min(self.lease / 3, self.poll_interval)
        last_purge = 0.0
        while not stopping.wait(tick):
            try:
                if self.workers and self.store.next_due(self.queues, self._limits) == 0:
                    self.notify_submitted(self.workers)  # the fallback: no wake-up came
                self._renew_leases()
                self._recover()
                if time.monotonic() - last_purge >= min(self.purge_interval, self.retention):
                    last_purge = time.monotonic()
                    self.purge()
                    self.store.maintain()
            except StoreError as exc:
                if not stopping.is_set():
                    log.error("housekeeping failed, retrying: %s", exc)

    def _clock(self, stopping):
        """Make the jobs of due schedule slots, waking at the next slot (and at least
        every clock_interval, for schedules put by other processes); expire jobs;
        refresh this process's heartbeat every HEARTBEAT seconds."""
        failing, beat_at = False, time.monotonic() + HEARTBEAT
        while not stopping.is_set():
            self._rescheduled.clear()  # before the look: a change meanwhile wakes the wait
            made = []
            if time.monotonic() >= beat_at:
                beat_at = time.monotonic() + HEARTBEAT
                try:
                    self._heartbeat()
                except StoreError as exc:  # an outage: the schedules' look says so
                    log.debug("heartbeat failed: %s", exc)
            try:
                # Expiry first: a schedule that cannot be made does not hold it up.
                for token in self.store.expire():
                    log.info("job %s expired before it could start", token,
                             extra={"token": token, "status": CANCELED})
                made = self.store.fire_schedules(self.retries)
                if made:
                    self.notify_submitted(len(made))
                self.refresh_limits()  # the fallback: no signal came
                due = self.store.next_schedule()
                if failing:
                    log.info("making scheduled jobs works again")
                failing = False
            except Exception as exc:  # a store outage, or a row it cannot read: it goes on
                if not failing and not stopping.is_set():
                    log.error("making scheduled jobs failed; retrying every %gs: %s",
                              self.poll_interval, exc, exc_info=not isinstance(exc, StoreError))
                failing, due = True, self.poll_interval
            if due == 0 and not made:
                due = 0.005  # due, but another process is making its job right now
            self._rescheduled.wait(self.clock_interval if due is None
                                   else min(due, self.clock_interval))

    def _renew_leases(self):
        """Renew the leases of the jobs live here; stop those canceled elsewhere."""
        with self._lock:
            runs = {token: job.attempts for token, (job, _) in self._live.items()}
            runs.update((row["token"], row["attempts"]) for row, _ in self._ready)
        if runs:  # only these: a job whose thread died must lose its lease
            held = self.store.renew(self.owner, runs, self.lease)
            for token in runs.keys() - held:  # canceled (or taken back) elsewhere
                self.cancel_local(token, runs[token])

    def _listen(self, stopping):
        """Wake idle workers as soon as another process queues jobs, and stop the
        jobs canceled there, instead of waiting for the housekeeper's next look."""
        listener, deaf = self.store.listen(self.workers), False
        try:
            while not stopping.is_set():
                try:
                    waiting, changed = listener.wait(self.listen_timeout)
                    if changed:  # a cancel, or a queue's settings
                        self._renew_leases()
                        self.refresh_limits()
                except StoreError as exc:
                    if not stopping.wait(self.poll_interval) and not deaf:
                        log.warning("listening for other processes failed: wake-ups wait"
                                    " for the poll (once a second) until it works: %s", exc)
                    deaf = True
                    continue
                if deaf:
                    log.info("listening for other processes works again")
                    deaf = False
                if waiting:
                    self.notify_submitted(waiting)
        finally:
            listener.close()

    def _recover(self):
        lost = [owner for owner in self.store.running_owners() if _owner_is_gone(owner)]
        for token, status in self.store.recover(self.max_attempts, lost):
            log.warning("job %s lost its worker; now %s", token, status,
                        extra={"token": token, "status": status})

    def purge(self):
        """Delete finished jobs older than `retention`, in small batches."""
        total = 0
        while True:
            purged = self.store.purge(self.retention)
            total += purged
            if purged < PURGE_BATCH:
                break
        if total:
            log.info("purged %d finished jobs", total)
        return total


def _owner_is_gone(owner):
    """True when `owner` was a process on this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


# -- WSGI app ----------------------------------------------------------------

MESSAGES = {QUEUED: "Na fila", RUNNING: "Em processamento", DONE: "Finalizado",
            FAILED: "Falhou", CANCELED: "Cancelado"}
ACCEPTED_MESSAGE = "Itens recebidos para processamento"
INVALID_MARKER = "INVALID_JOB_REQUEST"
# Patterns as JSON Schema (ECMA-262) writes them: the OpenAPI document shows these,
# and the App matches the same text (see ecma_regex).
TOKEN_PATTERN = "^[0-9a-f]{32}$"  # a job's token, and a batch's id
IDEMPOTENCY_KEY_PATTERN = KEY_PATTERN
TOKEN_RE = ecma_regex(TOKEN_PATTERN)
DIGITS_RE = re.compile(r"[0-9]+\Z")
SECONDS_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
CURSOR_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
SEGMENT_RE = re.compile(r"[^/]+\Z")
IDEMPOTENCY_KEY_RE = ecma_regex(IDEMPOTENCY_KEY_PATTERN)
MAX_DEPTH = 32  # nesting levels of a body; the top-level array is level 1
MAX_WAIT = 30.0
MAX_LIMIT = 50, 500  # default and largest page size of GET /jobs
QUEUE_FULL_RETRY_AFTER = 5
STATUS_LINES = {code.value: f"{code.value} {code.phrase}" for code in http.HTTPStatus}
# The routes that need the API key when one is set, named as in the OpenAPI document.
GUARDED = frozenset({("POST", "/api"), ("DELETE", "/check/{token}"), ("DELETE", "/batch/{id}"),
                     ("GET", "/jobs"), ("GET", "/metrics"), ("GET", "/schedules"),
                     ("GET", "/schedules/{name}"), ("PUT", "/schedules/{name}"),
                     ("DELETE", "/schedules/{name}"), ("POST", "/check/{token}/retry"),
                     ("POST", "/jobs/retry"), ("POST", "/jobs/cancel"), ("GET", "/queues"),
                     ("GET", "/queues/{name}"), ("PATCH", "/queues/{name}"),
                     ("GET", "/workers")})
QUEUE_SETTINGS = ("paused", "concurrency", "rate")
# GET /queues and the per-queue gauge: a read slower than QUEUES_SLOW seconds is used
# again for QUEUES_FRESH times as long (QUEUES_FRESH_MOST seconds at most).
QUEUES_SLOW, QUEUES_FRESH, QUEUES_FRESH_MOST = 0.01, 20, 10.0
MAX_LIMIT_VALUE = 2 ** 31 - 1  # the largest concurrency or rate limit (PostgreSQL's integer)
MAX_RATE_PER = 86400.0


def iso_time(timestamp):
    """Epoch seconds as ISO 8601 UTC with milliseconds, or None."""
    if timestamp is None:
        return None
    seconds, millis = divmod(int(timestamp * 1000), 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds):
    # A job's times share their second more often than not; strftime is the cost.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def job_view(row, now):
    """The public JSON view of one job row."""
    status = row["status"]
    view = {"message": MESSAGES[status], "status": status, "hash": row["token"],
            "item": row["item"], "valor": row["valor"],
            "created_at": iso_time(row["created_at"]),
            "started_at": iso_time(row["started_at"]),
            "finished_at": iso_time(row["finished_at"]), "attempts": row["attempts"],
            "queue": row["queue"], "priority": row["priority"], "retries": row["retries"],
            "run_at": iso_time(row["run_at"]), "batch": row["batch"],
            "worker": row["owner"]}
    if status == RUNNING:
        view["progress"] = job_progress(row, now)
    elif status == DONE and row["result"] is not None:
        view["result"] = json.loads(row["result"])
    if row["error"] is not None and status != DONE:  # a retry's wait shows why
        view["error"] = row["error"]
    if row["unique_key"] is not None:
        view["unique"] = row["unique_key"]
    if row["expires_at"] is not None:
        view["expires"] = iso_time(row["expires_at"])
    if row["schedule"] is not None:
        view["schedule"] = row["schedule"]
    if row["timeout"] is not None:
        view["timeout"] = row["timeout"]
    return view


def schedule_view(row):
    """The public JSON view of one schedule row."""
    view = {"name": row["name"]}
    if row["cron"] is not None:
        view["cron"] = row["cron"]
    else:
        every = row["every"]
        view["every"] = int(every) if float(every).is_integer() else every
    view.update(timezone=row["timezone"], job=row["job"], paused=row["paused"],
                next_run_at=None if row["paused"] else iso_time(row["next_run_at"]),
                last_run_at=iso_time(row["last_run_at"]), last_job=row["last_job"],
                created_at=iso_time(row["created_at"]), updated_at=iso_time(row["updated_at"]))
    return view


def load_schedules(path, validator, fast_check=None):
    """{name: schedule} of a schedules file; SettingsError naming what is wrong."""
    try:
        with open(path, "rb") as file:
            body = parse_json(file.read())
    except OSError as exc:
        raise SettingsError(f"schedules: cannot read {os.fspath(path)!r}: "
                            f"{exc.strerror or exc}") from None
    except ApiError as exc:
        raise SettingsError(f"schedules: {os.fspath(path)!r}: "
                            + exc.message.replace("the body", "the file")) from None
    if not isinstance(body, dict):
        raise SettingsError("schedules: the file must hold a JSON object {name: schedule}")
    schedules = {}
    for name, schedule in body.items():
        if not QUEUE_RE.match(name):
            raise SettingsError(f"schedules: {name!r}: a schedule's name must match"
                                f" {QUEUE_PATTERN}")
        try:
            schedules[name] = check_schedule(schedule, validator, fast_check)
        except ValueError as exc:
            raise SettingsError(f"schedules: {name!r}: {exc}") from None
    return schedules


class InvalidQueueSettings(ValueError):
    """A PATCH of a queue's settings that cannot be applied; the message says why."""


def merge_queue(before, patch):
    """A queue's settings after `patch`, a JSON merge patch (RFC 7396) of paused,
    concurrency and rate; InvalidQueueSettings saying what is wrong. A rate given without
    `per` counts starts per second."""
    if not isinstance(patch, dict):
        raise InvalidQueueSettings("the body must be a JSON object: a merge patch of"
                         f" {', '.join(QUEUE_SETTINGS)}")
    for key in patch.keys() - set(QUEUE_SETTINGS):
        raise InvalidQueueSettings(f"a queue has no setting {key!r}; it has"
                         f" {', '.join(QUEUE_SETTINGS)}")
    after = dict(before)
    if "paused" in patch:
        if patch["paused"] is not None and not isinstance(patch["paused"], bool):
            raise InvalidQueueSettings("paused must be true or false (null: false)")
        after["paused"] = bool(patch["paused"])
    if "concurrency" in patch:
        after["concurrency"] = _limit_value("concurrency", patch["concurrency"], nullable=True)
    if "rate" in patch:
        rate = patch["rate"]
        if rate is not None and not isinstance(rate, dict):
            raise InvalidQueueSettings("rate must be an object {limit, per} (null: no limit)")
        for key in (rate or {}).keys() - {"limit", "per"}:
            raise InvalidQueueSettings(f"a rate has no {key!r}; it has limit and per")
        merged = {key: value for key, value in {**(before["rate"] or {}), **rate}.items()
                  if value is not None} if rate is not None else None
        if merged is not None:
            per = merged.get("per", 1.0)
            if isinstance(per, bool) or not isinstance(per, (int, float)) or not (
                    0 < per <= MAX_RATE_PER):
                raise InvalidQueueSettings(f"rate's per must be a number of seconds above 0, at most"
                                 f" {MAX_RATE_PER:g} (a day)")
            merged = {"limit": _limit_value("rate's limit", merged.get("limit")),
                      "per": float(per)}
        after["rate"] = merged
    return after


def _limit_value(name, value, nullable=False):
    """A concurrency or a rate's limit: a whole number from 1 (or None if `nullable`)."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            float(value).is_integer() and 1 <= value <= MAX_LIMIT_VALUE):
        raise InvalidQueueSettings(f"{name} must be a whole number from 1 to {MAX_LIMIT_VALUE}"
                         + (" (null: no limit)" if nullable else ""))
    return int(value)


def batch_view(batch, now):
    """The public JSON view of a batch: its jobs in input order, counted by state."""
    jobs = [job_view(row, now) for row in batch["jobs"]]
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        counts[job["status"]] += 1
    return {"batch": batch["batch"], "created_at": iso_time(batch["created_at"]),
            "total": batch["total"], "counts": counts,
            "finished": all(job["status"] in FINAL_STATES for job in jobs), "jobs": jobs}


def job_progress(row, now):
    """Reported progress, else the time elapsed over valor (the expected duration)."""
    if row["progress"] is not None:
        return row["progress"]
    if not row["valor"]:
        return 1.0
    return round(min(1.0, max(0.0, (now - row["started_at"]) / row["valor"])), 3)


def parse_json(body):
    """The body as JSON, strictly: UTF-8, finite numbers, at most MAX_DEPTH deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise ApiError(400, "invalid_json", "the body starts with a byte order mark")
    try:
        value = json.loads(text, parse_constant=_reject_constant,
                           parse_float=_finite_float, parse_int=_finite_int)
    except RecursionError:
        value = None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    else:
        if not _deeper_than(value, MAX_DEPTH):
            return value
    raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_DEPTH} levels")


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is not a finite number")
    return number


def _finite_int(text):
    number = int(text)
    try:
        float(number)
    except OverflowError:
        raise ValueError(f"{text[:20]}... is too large for a number") from None
    return number


def _deeper_than(value, limit):
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (list, dict)))
    return False


def encode_cursor(job_id):
    return base64.urlsafe_b64encode(f"before:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor):
    """The job id in a cursor this service handed out; ApiError otherwise."""
    if CURSOR_RE.match(cursor):
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            text = ""
        match = re.fullmatch(r"before:([1-9][0-9]{0,18})", text)
        if match and encode_cursor(int(match[1])) == cursor:
            return int(match[1])
    raise ApiError(400, "invalid_cursor", "before must be a cursor from a previous page")


_encoder = json.JSONEncoder(ensure_ascii=False)  # built once: json.dumps(...) would not


def json_body(payload):
    # backslashreplace turns a stray lone surrogate into its JSON escape.
    return _encoder.encode(payload).encode("utf-8", "backslashreplace")


def error_payload(error, message):
    return {"message": message, "error": error}


def error_response(error):
    """(status, headers, body) of an ApiError."""
    return (error.status, [("Content-Type", "application/json"), *error.headers],
            json_body(error_payload(error.error, error.message)))


def store_unavailable():
    """The answer while the store cannot be used: the client should try again soon."""
    return ApiError(503, "store_unavailable", "the job store cannot be used",
                    [("Retry-After", "1")])


def respond(start_response, status, headers, body):
    """Send one response with the headers every response carries."""
    headers = [*headers, ("Content-Length", str(len(body))),
               ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store")]
    start_response(STATUS_LINES[status], headers)
    return [body]


def openapi_document(schema, settings):
    """An OpenAPI 3.1 description of every route; `schema` is the validator's own dict."""
    def reply(description, body=None, headers=None):
        response = {"description": description}
        if body is not None:
            response["content"] = {"application/json": {"schema": body}}
        if headers:  # name: description, or (description, schema) if not an integer
            response["headers"] = {
                name: {"description": text[0], "schema": text[1]} if isinstance(text, tuple)
                else {"description": text, "schema": {"type": "integer"}}
                for name, text in headers.items()}
        return response

    error = {"$ref": "#/components/schemas/Error"}
    job = {"$ref": "#/components/schemas/Job"}
    poll = {"Retry-After": "present while the job is not final: seconds to wait"}
    bad = {"400": reply("malformed request (see error)", error)}
    token = {"name": "token", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": TOKEN_PATTERN}}
    not_found = {"404": reply("no job has this token", error)}
    batch_id = {"name": "id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": TOKEN_PATTERN}}
    no_batch = {"404": reply("no batch has this id", error)}
    wait = {"name": "wait", "in": "query", "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT}}
    batch = {"$ref": "#/components/schemas/Batch"}
    replayed = "true when this is the kept answer to an earlier request with this key"
    schedule_ref = {"$ref": "#/components/schemas/Schedule"}
    name = {"name": "name", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": QUEUE_PATTERN}}
    no_schedule = {"404": reply("no schedule has this name", error)}
    time_or_null = {"type": ["string", "null"], "format": "date-time"}
    count = {"type": "object", "required": ["count"], "properties": {"count": {"type": "integer"}}}
    queue_ref = {"$ref": "#/components/schemas/Queue"}
    limit_value = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT_VALUE}

    def operation(summary, parameters=(), *, responses, **extra):
        op = {"summary": summary, "responses": responses}
        if parameters:
            op["parameters"] = list(parameters)
        return {**op, **extra}

    document = {
        "openapi": "3.1.0",
        "info": {"title": "queue_tool", "version": __version__,
                 "description": "A tiny durable job queue."},
        "paths": {
            "/api": {"post": operation(
                "Submit a batch of items", [{
                    "name": "Idempotency-Key", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                    "description": "a retry with the same key and body gets the first"
                                   " answer and queues nothing"}],
                requestBody={"required": True, "content": {"application/json": {
                    "schema": {"type": "array", "minItems": 1,
                               "maxItems": settings.max_items, "items": schema}}}},
                responses={
                    "202": reply("the batch is stored; one result per item",
                                 {"$ref": "#/components/schemas/Accepted"},
                                 {"Idempotent-Replayed": (replayed, {"const": "true"})}),
                    **bad,
                    "413": reply("body or batch too large", error),
                    "415": reply("Content-Type is not JSON", error),
                    "422": reply("the Idempotency-Key came with another body", error),
                    "503": reply("queue full", error, {"Retry-After": "seconds"})})},
            "/batch/{id}": {
                "get": operation(
                    "Follow a batch", [batch_id, wait],
                    responses={"200": reply("the batch, its jobs in input order", batch, {
                        "Retry-After": "present while a job is not final: seconds to wait"}),
                        **bad, **no_batch}),
                "delete": operation(
                    "Cancel a batch's unfinished jobs", [batch_id],
                    responses={"200": reply("the batch", batch), **no_batch})},
            "/check/{token}": {
                "get": operation(
                    "Follow a job", [token, wait],
                    responses={"200": reply("the job", job, poll), **bad, **not_found}),
                "delete": operation(
                    "Cancel a queued or running job", [token],
                    responses={"200": reply("the canceled job", job), **not_found,
                               "409": reply("the job is already final", error)})},
            "/check/{token}/retry": {"post": operation(
                "Put a failed or canceled job back in the queue, to run now", [token],
                responses={"200": reply("the job, queued", job), **not_found,
                           "409": reply("not_retryable: the job is not failed or canceled,"
                                        " or a live job holds its unique key", error)})},
            "/jobs/retry": {"post": operation(
                "Retry every failed or canceled job", [
                    {"name": "status", "in": "query", "schema": {"enum": [FAILED, CANCELED]}},
                    {"name": "queue", "in": "query",
                     "schema": {"type": "string", "pattern": QUEUE_PATTERN}}],
                responses={"200": reply("how many went back", count), **bad})},
            "/jobs/cancel": {"post": operation(
                "Cancel every queued or running job", [
                    {"name": "status", "in": "query", "schema": {"enum": [QUEUED, RUNNING]}},
                    {"name": "queue", "in": "query",
                     "schema": {"type": "string", "pattern": QUEUE_PATTERN}}],
                responses={"200": reply("how many were canceled", count), **bad})},
            "/jobs": {"get": operation(
                "List jobs, newest first", [
                    {"name": "status", "in": "query", "schema": {"enum": list(STATES)}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT[1],
                                "default": MAX_LIMIT[0]}},
                    {"name": "before", "in": "query", "schema": {"type": "string"},
                     "description": "the `next` cursor of the previous page"},
                    {"name": "queue", "in": "query",
                     "schema": {"type": "string", "pattern": QUEUE_PATTERN}}],
                responses={"200": reply("a page of jobs", {
                    "type": "object", "required": ["jobs", "next"],
                    "properties": {"jobs": {"type": "array", "items": job},
                                   "next": {"type": ["string", "null"]}}}), **bad})},
            "/schedules": {"get": operation("List schedules, by name", responses={
                "200": reply("every schedule", {
                    "type": "object", "required": ["schedules"],
                    "properties": {"schedules": {"type": "array", "items": schedule_ref}}})})},
            "/schedules/{name}": {
                "get": operation("Read a schedule", [name], responses={
                    "200": reply("the schedule", schedule_ref), **no_schedule}),
                "put": operation(
                    "Create or replace a schedule", [name],
                    requestBody={"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ScheduleBody"}}}},
                    responses={
                        "200": reply("replaced", schedule_ref),
                        "201": reply("created", schedule_ref,
                                     {"Location": ("its path", {"type": "string"})}),
                        "400": reply("invalid_schedule (or a malformed body)", error),
                        "415": reply("Content-Type is not JSON", error)}),
                "delete": operation("Remove a schedule", [name], responses={
                    "200": reply("its last view", schedule_ref), **no_schedule})},
            "/queues": {"get": operation("List the queues a job or a setting named", responses={
                "200": reply("every queue, by name", {
                    "type": "object", "required": ["queues"],
                    "properties": {"queues": {"type": "array", "items": queue_ref}}})})},
            "/queues/{name}": {
                "get": operation("Read a queue", [name], responses={
                    "200": reply("the queue", queue_ref), **bad,
                    "404": reply("no job or setting names this queue", error)}),
                "patch": operation(
                    "Pause, resume or limit a queue (a JSON merge patch)", [name],
                    requestBody={"required": True, "content": {
                        media: {"schema": {"$ref": "#/components/schemas/QueuePatch"}}
                        for media in ("application/merge-patch+json", "application/json")}},
                    responses={
                        "200": reply("the queue as it is now", queue_ref),
                        "400": reply("invalid_queue_settings or invalid_queue (or a malformed"
                                     " body); nothing changed", error),
                        "415": reply("Content-Type is not JSON", error)})},
            "/workers": {"get": operation(
                "List the processes of the fleet, alive ones first", responses={
                    "200": reply(f"every process seen within {GONE_KEPT / 3600:g} hour", {
                        "type": "object", "required": ["processes"],
                        "properties": {"processes": {"type": "array", "items": {
                            "$ref": "#/components/schemas/Process"}}}})})},
            "/health": {"get": operation("Liveness and queue depth", responses={
                "200": reply("the service can read its store", {
                    "type": "object", "properties": {
                        "status": {"const": "ok"}, "workers": {"type": "integer"},
                        "queued": {"type": "integer"}, "running": {"type": "integer"}}}),
                "503": reply("the store cannot be read", error)})},
            "/metrics": {"get": operation(
                "Prometheus metrics", responses={"200": {
                    "description": "the Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}})},
            "/": {"get": operation("The dashboard: a live page for operators", responses={
                "200": {"description": "an HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}}}})},
            "/openapi.json": {"get": operation("This document", responses={
                "200": reply("the OpenAPI document", {"type": "object"})})},
        },
        "components": {
            "schemas": {
                "Item": schema,
                "Error": {"type": "object", "required": ["message", "error"],
                          "properties": {"message": {"type": "string"},
                                         "error": {"type": "string"}}},
                "Accepted": {"type": "object", "properties": {
                    "message": {"const": ACCEPTED_MESSAGE},
                    "processing_items": {"type": "array", "items": {
                        "type": "object", "required": ["hash", "index", "item"],
                        "properties": {
                            "hash": {"type": "string"}, "index": {"type": "integer"},
                            "item": {"type": ["string", "null"]},
                            "status": {"enum": list(STATES),
                                       "description": "queued; a duplicate's: its job's now"},
                            "check": {"type": "string"}, "error": {"type": "string"},
                            "duplicate": {"const": True, "description":
                                          "a job with this item's unique key was there:"
                                          " hash names it, and nothing was queued"}}}},
                    "batch": {"type": "string"}, "check_batch": {"type": "string"}}},
                "Batch": {"type": "object", "properties": {
                    "batch": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "total": {"type": "integer"},
                    "counts": {"type": "object", "properties": {
                        state: {"type": "integer"} for state in STATES}},
                    "finished": {"type": "boolean"},
                    "jobs": {"type": "array", "items": job}}},
                "Job": {"type": "object", "properties": {
                    "message": {"enum": list(MESSAGES.values())},
                    "status": {"enum": list(STATES)}, "hash": {"type": "string"},
                    "item": {"type": "string"}, "valor": {"type": "number"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                    "finished_at": {"type": ["string", "null"], "format": "date-time"},
                    "attempts": {"type": "integer"},
                    "queue": {"type": "string"}, "priority": {"type": "integer"},
                    "retries": {"type": "integer"},
                    "run_at": {"type": "string", "format": "date-time",
                               "description": "when it may start next"},
                    "batch": {"type": ["string", "null"]},
                    "worker": {"type": ["string", "null"],
                               "description": "the process that runs or last ran it"},
                    "progress": {"type": "number", "minimum": 0, "maximum": 1},
                    "result": {}, "error": {"type": "string"},
                    "unique": {"type": "string"},
                    "expires": {"type": "string", "format": "date-time",
                                "description": "the latest it may start"},
                    "schedule": {"type": "string", "description": "the schedule that made it"},
                    "timeout": {"type": "number", "description": "seconds one run may take"}}},
                "ScheduleBody": {
                    "type": "object", "required": ["job"], "additionalProperties": False,
                    "oneOf": [{"required": ["cron"]}, {"required": ["every"]}],
                    "properties": {
                        "cron": {"type": "string", "description":
                                 "five fields (minute hour day month weekday) or @daily etc."},
                        "every": {"type": "number", "minimum": 1, "maximum": MAX_EVERY,
                                  "description": "seconds; slots at multiples since the epoch"},
                        "timezone": {"type": "string", "default": "UTC",
                                     "description": "an IANA name; cron only"},
                        "job": {"$ref": "#/components/schemas/Item",
                                "description": "an item; any option but delay"},
                        "paused": {"type": "boolean", "default": False}}},
                "QueuePatch": {"type": "object", "additionalProperties": False, "properties": {
                    "paused": {"type": ["boolean", "null"],
                               "description": "true: no job of the queue starts anywhere"},
                    "concurrency": {**limit_value, "type": ["integer", "null"],
                                    "description": "most jobs running at once, fleet-wide"},
                    "rate": {"type": ["object", "null"], "additionalProperties": False,
                             "description": "most starts within any `per` seconds",
                             "properties": {
                                 "limit": limit_value,
                                 "per": {"type": "number", "exclusiveMinimum": 0,
                                         "maximum": MAX_RATE_PER, "default": 1}}}}},
                "Queue": {"type": "object", "properties": {
                    "name": {"type": "string"}, "queued": {"type": "integer"},
                    "running": {"type": "integer"}, "paused": {"type": "boolean"},
                    "concurrency": {"type": ["integer", "null"]},
                    "rate": {"type": ["object", "null"], "properties": {
                        "limit": {"type": "integer"}, "per": {"type": "number"}}}}},
                "Process": {"type": "object", "properties": {
                    "id": {"type": "string"}, "host": {"type": "string"},
                    "pid": {"type": "integer"}, "version": {"type": "string"},
                    "started_at": {"type": "string", "format": "date-time"},
                    "heartbeat_at": {"type": "string", "format": "date-time"},
                    "http": {"type": "boolean", "description": "it serves HTTP"},
                    "workers": {"type": "integer"},
                    "busy": {"type": "integer", "description": "jobs it runs now"},
                    "queues": {"type": ["array", "null"], "items": {"type": "string"},
                               "description": "the queues it works; null: every queue"},
                    "alive": {"type": "boolean",
                              "description": f"a heartbeat within {ALIVE_WITHIN:g} s"}}},
                "Schedule": {"type": "object", "properties": {
                    "name": {"type": "string"}, "cron": {"type": "string"},
                    "every": {"type": "number"}, "timezone": {"type": ["string", "null"]},
                    "job": {"type": "object"}, "paused": {"type": "boolean"},
                    "next_run_at": {**time_or_null, "description": "null while paused"},
                    "last_run_at": time_or_null, "last_job": {"type": ["string", "null"]},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"}}},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            if settings.api_key and (method.upper(), path) in GUARDED:
                op["responses"]["401"] = reply("missing or wrong API key", error)
                op["security"] = [{"bearer": []}]
    return document


class App:
    """The WSGI callable: routing, request parsing and JSON responses.

    `start()` starts the worker threads (done on the first request otherwise);
    `close()` stops them.
    """

    def __init__(self, settings, store, runner):
        self.settings, self.store, self.runner = settings, store, runner
        limits = (settings.max_valor, settings.max_delay)
        self.schema = (ITEM_SCHEMA if limits == (Settings.max_valor, Settings.max_delay)
                       else item_schema(*limits))
        self.validator = compile_schema(self.schema)
        self.fast_check = compile_fast_check(self.schema)
        self._api_key = None if settings.api_key is None else settings.api_key.encode()
        self._routes = {
            "/": {"GET": self.get_dashboard},
            "/api": {"POST": self.post_api},
            "/check/{token}": {"GET": self.get_check, "DELETE": self.delete_check},
            "/check/{token}/retry": {"POST": self.post_retry},
            "/batch/{id}": {"GET": self.get_batch, "DELETE": self.delete_batch},
            "/jobs": {"GET": self.get_jobs},
            "/jobs/retry": {"POST": self.post_jobs_retry},
            "/jobs/cancel": {"POST": self.post_jobs_cancel},
            "/queues": {"GET": self.get_queues},
            "/queues/{name}": {"GET": self.get_queue, "PATCH": self.patch_queue},
            "/schedules": {"GET": self.get_schedules},
            "/schedules/{name}": {"GET": self.get_schedule, "PUT": self.put_schedule,
                                  "DELETE": self.delete_schedule},
            "/workers": {"GET": self.get_workers},
            "/health": {"GET": self.get_health},
            "/metrics": {"GET": self.get_metrics},
            "/openapi.json": {"GET": self.get_openapi},
        }
        self._openapi = None
        self._queues_read = (0.0, [])  # (monotonic time it is stale, queue views)

    def start(self):
        self.runner.start()

    def close(self, grace=None):
        """Stop the workers (see Runner.stop) and close the store."""
        requeued = self.runner.stop(grace)
        self.store.close()
        return requeued

    def __call__(self, environ, start_response):
        started = time.monotonic()
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        try:
            self.runner.start()
            handler, args, guarded = self._route(method, path)
            if guarded:
                self._authorize(environ)
            status, headers, body = handler(environ, *args)
        except ApiError as exc:
            status, headers, body = error_response(exc)
        except StoreError as exc:
            log.error("%s %s: the store failed: %s", method, path, exc)
            status, headers, body = error_response(store_unavailable())
        except Exception as exc:
            status, headers = 500, [("Content-Type", "application/json")]
            payload = error_payload("internal_error", "the server failed; see its log")
            if self.settings.debug:
                log.exception("%s %s failed", method, path)
                payload["traceback"] = traceback.format_exc()
            else:
                log.error("%s %s failed: %s: %s", method, path, type(exc).__name__, exc)
            body = json_body(payload)
        took = (time.monotonic() - started) * 1e3
        log.info("%s %s %d %.1fms", method, path, status, took, extra={
            "method": method, "path": path, "status": status, "duration_ms": round(took, 3)})
        response = respond(start_response, status, headers, body)
        return [b""] if method == "HEAD" else response

    def _route(self, method, path):
        """(the handler for a request, its arguments, whether it needs the API key);
        404 or 405 otherwise."""
        args = ()
        for prefix, route, pattern, what in (
                ("/check/", "/check/{token}", TOKEN_RE, "job has this token"),
                ("/batch/", "/batch/{id}", TOKEN_RE, "batch has this id"),
                # Any name here: the handlers say what is wrong with one (a PUT: 400).
                ("/schedules/", "/schedules/{name}", SEGMENT_RE, "schedule has this name"),
                ("/queues/", "/queues/{name}", SEGMENT_RE, "queue has this name")):
            if path.startswith(prefix):
                name, path = path[len(prefix):], route
                if route == "/check/{token}" and name.endswith("/retry"):
                    name, path = name[:-len("/retry")], "/check/{token}/retry"
                if not pattern.match(name):
                    raise ApiError(404, "not_found", f"no {what}")
                args = (name,)
        methods = self._routes.get(path)
        if methods is None:
            raise ApiError(404, "not_found", f"there is nothing at {path}")
        verb = "GET" if method == "HEAD" else method
        handler = methods.get(verb)
        if handler is None:
            allowed = [*methods, "HEAD"] if "GET" in methods else list(methods)
            raise ApiError(405, "method_not_allowed", f"{path} does not take {method}",
                           [("Allow", ", ".join(allowed))])
        return handler, args, (verb, path) in GUARDED

    def _authorize(self, environ):
        if self._api_key is None:
            return
        scheme, _, key = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        given = key.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._api_key):
            raise ApiError(401, "unauthorized", "this route needs Authorization: Bearer <key>",
                           [("WWW-Authenticate", 'Bearer realm="queue_tool"')])

    # Request parts.

    @staticmethod
    def _query(environ):
        """Query parameters; a repeated one keeps its last value."""
        query = environ.get("QUERY_STRING")
        return dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {}

    def _read_body(self, environ):
        """The request body, refused (413) past max_body before it is all read."""
        limit, stream = self.settings.max_body, environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH", "").strip()
        if not length:
            if not environ.get("wsgi.input_terminated"):
                return b""
            # A chunked body: read it in pieces, stopping one byte past the limit.
            chunks, size = [], 0
            while size <= limit:
                chunk = stream.read(min(65536, limit + 1 - size))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                size += len(chunk)
            raise self._too_large()
        if not DIGITS_RE.match(length):
            raise ApiError(400, "invalid_content_length",
                           f"Content-Length must be a non-negative integer, not {length!r}")
        size = int(length)
        if size > limit:
            raise self._too_large()
        try:
            body = stream.read(size) if size else b""
        except OSError:
            body = b""
        if len(body) != size:
            raise ApiError(400, "invalid_content_length",
                           "the body is shorter than its Content-Length")
        return body

    def _too_large(self):
        return ApiError(413, "body_too_large",
                        f"the body is larger than {self.settings.max_body} bytes")

    @staticmethod
    def _require_json(environ):
        given = environ.get("CONTENT_TYPE", "")
        media = given.partition(";")[0].strip().lower()
        if given and not (media == "application/json" or (
                media.startswith("application/") and media.endswith("+json"))):
            raise ApiError(415, "unsupported_media_type",
                           f"the body must be application/json, not {media or given!r}")

    def _job_response(self, status, row):
        headers = [("Content-Type", "application/json")]
        if row["status"] not in FINAL_STATES:
            headers.append(("Retry-After", "1"))
        return status, headers, json_body(job_view(row, time.time()))

    @staticmethod
    def _json(status, payload, headers=()):
        return status, [("Content-Type", "application/json"), *headers], json_body(payload)

    # Handlers, one per route and method.

    def post_api(self, environ):
        """Submit a batch: 202 (a replay of the first answer for a known
        Idempotency-Key), or 400/413/415/422/503 with nothing queued."""
        self._require_json(environ)
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
            raise ApiError(400, "invalid_idempotency_key",
                           "Idempotency-Key must be 1 to 255 printable ASCII characters")
        batch = parse_json(self._read_body(environ))
        if not isinstance(batch, list):
            raise ApiError(400, "not_a_list", "the body must be a JSON array of items")
        if not batch:
            raise ApiError(400, "empty_batch", "the array has no items")
        if len(batch) > self.settings.max_items:
            raise ApiError(413, "too_many_items",
                           f"a batch holds at most {self.settings.max_items} items,"
                           f" not {len(batch)}")
        results, jobs, places = [], [], []  # places: each job's index in the batch
        prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
        for index, entry in enumerate(batch):
            item, error = check_item(entry, self.validator, self.fast_check)
            if error is None:
                job = NewJob.from_item(entry, self.settings.retries)
                jobs.append(job)
                places.append(index)
                results.append({"hash": job.token, "index": index, "item": item,
                                "status": QUEUED, "check": f"{prefix}/check/{job.token}"})
            else:
                results.append({"hash": INVALID_MARKER, "index": index, "item": item,
                                "error": error})
        batch_id, body = secrets.token_hex(16), None

        def render(duplicates):
            """The 202 body, once the store said which jobs are duplicates."""
            nonlocal body
            if body is None:
                for position, (token, status) in duplicates.items():
                    index = places[position]
                    results[index] = {"hash": token, "index": index,
                                      "item": results[index]["item"], "status": status,
                                      "check": f"{prefix}/check/{token}", "duplicate": True}
                body = json_body({"message": ACCEPTED_MESSAGE, "processing_items": results,
                                  "batch": batch_id, "check_batch": f"{prefix}/batch/{batch_id}"})
            return body

        fingerprint = key and hashlib.sha256(json.dumps(batch, sort_keys=True).encode()
                                             ).hexdigest()
        try:
            duplicates, earlier = self.store.submit(
                jobs, len(batch) - len(jobs), self.settings.max_queued, batch_id,
                None if key is None else (key, fingerprint, lambda found: render(found).decode()))
        except QueueFull as exc:
            raise ApiError(503, "queue_full", f"the queue is full: {exc}",
                           [("Retry-After", str(QUEUE_FULL_RETRY_AFTER))]) from None
        if earlier is not None:
            if earlier[0] != fingerprint:
                raise ApiError(422, "idempotency_key_reused",
                               "this Idempotency-Key came with another body")
            return 202, [("Content-Type", "application/json"),
                         ("Idempotent-Replayed", "true")], earlier[1].encode()
        if len(jobs) > len(duplicates):
            self.runner.notify_submitted(len(jobs) - len(duplicates))
        return 202, [("Content-Type", "application/json")], render(duplicates)

    def _wait(self, environ):
        """The ?wait=S of a request in seconds, None without one; 400 if bad."""
        wait = self._query(environ).get("wait")
        if wait is None:
            return None
        seconds = float(wait) if SECONDS_RE.match(wait) else 0.0
        if not 0 < seconds <= MAX_WAIT:
            raise ApiError(400, "invalid_wait",
                           f"wait must be a number of seconds above 0, at most {MAX_WAIT:g}")
        return seconds

    def get_check(self, environ, token):
        """Follow a job: 200, 400 (bad wait) or 404."""
        wait = self._wait(environ)
        row = self.store.get(token) if wait is None else self.runner.wait_for(token, wait)
        if row is None:
            raise ApiError(404, "not_found", "no job has this token")
        return self._job_response(200, row)

    def get_batch(self, environ, batch_id):
        """Follow a batch: 200, 400 (bad wait) or 404."""
        wait = self._wait(environ)
        batch = (self.store.batch(batch_id) if wait is None
                 else self.runner.wait_for_batch(batch_id, wait))
        if batch is None:
            raise ApiError(404, "not_found", "no batch has this id")
        view = batch_view(batch, time.time())
        return self._json(200, view, [] if view["finished"] else [("Retry-After", "1")])

    def delete_batch(self, environ, batch_id):
        """Cancel a batch's unfinished jobs: 200 with the batch, or 404."""
        if self.runner.cancel_batch(batch_id) is None:
            raise ApiError(404, "not_found", "no batch has this id")
        return self._json(200, batch_view(self.store.batch(batch_id), time.time()))

    def delete_check(self, environ, token):
        """Cancel a queued or running job: 200, 404 or 409."""
        outcome = self.runner.cancel(token)
        if outcome is None:
            raise ApiError(404, "not_found", "no job has this token")
        before, after = outcome
        if before["status"] in FINAL_STATES:
            raise ApiError(409, "already_finished",
                           f"the job is already {before['status']}")
        return self._job_response(200, after)

    def post_retry(self, environ, token):
        """Put a failed or canceled job back in the queue: 200, 404 or 409."""
        row = self.store.get(token)
        if row is not None and row["status"] in (FAILED, CANCELED):
            if self.runner.retry_jobs(token=token):
                return self._job_response(200, self.store.get(token))
            row = self.store.get(token)  # held by its unique key, or changed meanwhile
        if row is None:
            raise ApiError(404, "not_found", "no job has this token")
        if row["status"] in (FAILED, CANCELED):
            raise ApiError(409, "not_retryable", "a queued or running job holds its unique key"
                                                 f" {row['unique_key']!r}")
        raise ApiError(409, "not_retryable", f"the job is {row['status']}; only a failed or"
                                             " canceled job can be retried")

    def _filters(self, environ, allowed):
        """(the statuses, the queue) of a bulk retry or cancel's query; 400 if bad."""
        query = self._query(environ)
        status, queue = query.get("status"), query.get("queue")
        if status is not None and status not in allowed:
            raise ApiError(400, "invalid_status", f"status must be one of {', '.join(allowed)}")
        if queue is not None and not QUEUE_RE.match(queue):
            raise ApiError(400, "invalid_queue", f"queue must match {QUEUE_PATTERN}")
        return (allowed if status is None else (status,)), queue

    def post_jobs_retry(self, environ):
        """Retry every failed or canceled job (?status=, ?queue=): 200 {"count": n}."""
        statuses, queue = self._filters(environ, (FAILED, CANCELED))
        return self._json(200, {"count": len(self.runner.retry_jobs(statuses, queue))})

    def post_jobs_cancel(self, environ):
        """Cancel every queued or running job (?status=, ?queue=): 200 {"count": n}."""
        statuses, queue = self._filters(environ, (QUEUED, RUNNING))
        return self._json(200, {"count": len(self.runner.cancel_jobs(statuses, queue))})

    def get_jobs(self, environ):
        """List jobs newest first: 200, or 400 for a bad parameter."""
        query = self._query(environ)
        status, limit, before = query.get("status"), query.get("limit"), query.get("before")
        queue = query.get("queue")
        if status is not None and status not in STATES:
            raise ApiError(400, "invalid_status", f"status must be one of {', '.join(STATES)}")
        if queue is not None and not QUEUE_RE.match(queue):
            raise ApiError(400, "invalid_queue", f"queue must match {QUEUE_PATTERN}")
        if limit is None:
            limit = MAX_LIMIT[0]
        elif DIGITS_RE.match(limit) and 1 <= int(limit) <= MAX_LIMIT[1]:
            limit = int(limit)
        else:
            raise ApiError(400, "invalid_limit",
                           f"limit must be a whole number from 1 to {MAX_LIMIT[1]}")
        before = None if before is None else decode_cursor(before)
        rows, next_id = self.store.list(status, before, limit, queue)
        now = time.time()
        return self._json(200, {"jobs": [job_view(row, now) for row in rows],
                                "next": None if next_id is None else encode_cursor(next_id)})

    def get_queues(self, environ):
        """Every queue a job or a setting named, by name: 200."""
        return self._json(200, {"queues": self._queue_list()})

    def _queue_list(self):
        """Every queue's view. A read that took long (the counting, on a store of
        millions of jobs) is used again until QUEUES_FRESH times its time has passed:
        the pages and scrapers that poll it cost the store a bounded share (a
        twentieth), however many they are. A settings change made here is seen at once."""
        now = time.monotonic()
        fresh, views = self._queues_read
        if now >= fresh:
            views = self.store.queues()
            took = time.monotonic() - now
            if took >= QUEUES_SLOW:
                self._queues_read = (now + min(QUEUES_FRESH * took, QUEUES_FRESH_MOST), views)
        return copy.deepcopy(views)

    @staticmethod
    def _queue_name(name):
        if not QUEUE_RE.match(name):
            raise ApiError(400, "invalid_queue", f"a queue's name must match {QUEUE_PATTERN}")
        return name

    def get_queue(self, environ, name):
        """One queue: 200, or 404 if no job or setting named it."""
        found = self.store.queues(self._queue_name(name))
        if not found:
            raise ApiError(404, "not_found", "no job or setting names this queue")
        return self._json(200, found[0])

    def patch_queue(self, environ, name):
        """Change a queue's settings with a JSON merge patch: 200 with its view;
        400 invalid_queue_settings, changing nothing, if bad."""
        self._queue_name(name)
        self._require_json(environ)
        patch = parse_json(self._read_body(environ))
        try:
            self.runner.set_queue(name, lambda before: merge_queue(before, patch))
        except InvalidQueueSettings as exc:
            raise ApiError(400, "invalid_queue_settings", str(exc)) from None
        self._queues_read = (0.0, [])
        view = self.store.queues(name)[0]
        log.info("queue %s: paused %s, concurrency %s, rate %s", name, view["paused"],
                 view["concurrency"], view["rate"])
        return self._json(200, view)

    def get_schedules(self, environ):
        """Every schedule, by name: 200."""
        return self._json(200, {"schedules": [schedule_view(row)
                                              for row in self.store.schedules()]})

    def get_schedule(self, environ, name):
        """One schedule: 200, or 404."""
        row = self.store.schedule(name) if QUEUE_RE.match(name) else None
        if row is None:
            raise ApiError(404, "not_found", "no schedule has this name")
        return self._json(200, schedule_view(row))

    def put_schedule(self, environ, name):
        """Create (201) or replace (200) a schedule; 400 invalid_schedule if bad."""
        if not QUEUE_RE.match(name):
            raise ApiError(400, "invalid_schedule",
                           f"a schedule's name must match {QUEUE_PATTERN}")
        self._require_json(environ)
        body = parse_json(self._read_body(environ))
        try:
            schedule = check_schedule(body, self.validator, self.fast_check)
        except ValueError as exc:
            raise ApiError(400, "invalid_schedule", str(exc)) from None
        row, created = self.store.put_schedule(name, schedule)
        self.runner.schedules_changed()
        log.info("schedule %s %s", name, "created" if created else "replaced")
        prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
        return self._json(201 if created else 200, schedule_view(row),
                          [("Location", f"{prefix}/schedules/{name}")] if created else [])

    def put_schedules(self, schedules):
        """Create or replace each of {name: schedule} (the schedules setting)."""
        for name, schedule in schedules.items():
            created = self.store.put_schedule(name, schedule)[1]
            log.info("schedule %s %s from the schedules file", name,
                     "created" if created else "replaced")
        self.runner.schedules_changed()

    def delete_schedule(self, environ, name):
        """Remove a schedule: 200 with its last view, or 404."""
        row = self.store.delete_schedule(name) if QUEUE_RE.match(name) else None
        if row is None:
            raise ApiError(404, "not_found", "no schedule has this name")
        self.runner.schedules_changed()
        log.info("schedule %s deleted", name)
        return self._json(200, schedule_view(row))

    def get_workers(self, environ):
        """The processes of the fleet: 200."""
        processes = self.store.processes()
        for process in processes:
            process["started_at"] = iso_time(process["started_at"])
            process["heartbeat_at"] = iso_time(process["heartbeat_at"])
        return self._json(200, {"processes": processes})

    def get_health(self, environ):
        """Liveness and queue depth: 200, or 503 when the store cannot be read."""
        counts = self.store.counts()
        return self._json(200, {"status": "ok", "workers": self.runner.alive_workers(),
                                **counts})

    def get_metrics(self, environ):
        """Counters and gauges in the Prometheus text format: 200."""
        counters, counts = self.store.counters(), self.store.counts()
        lines = []
        for name, kind, text, samples in (
            ("queue_tool_jobs_submitted_total", "counter", "Items accepted as jobs.",
             [("", counters["submitted"])]),
            ("queue_tool_items_invalid_total", "counter", "Items rejected as invalid.",
             [("", counters["invalid"])]),
            ("queue_tool_items_duplicate_total", "counter",
             "Items that queued nothing: a job with their unique key was there.",
             [("", counters["duplicate"])]),
            ("queue_tool_jobs_finished_total", "counter", "Jobs that reached a final state.",
             [(f'{{status="{s}"}}', counters["finished_" + s]) for s in sorted(FINAL_STATES)]),
            ("queue_tool_jobs_retried_total", "counter",
             "Retries scheduled after a processor raised.", [("", counters["retried"])]),
            ("queue_tool_jobs", "gauge", "Jobs queued or running now, in every process.",
             [(f'{{status="{s}"}}', counts[s]) for s in (QUEUED, RUNNING)]),
            ("queue_tool_workers", "gauge", "Worker threads alive in this process.",
             [("", self.runner.alive_workers())]),
            ("queue_tool_queue_jobs", "gauge", "Jobs queued or running now, by queue.",
             [(f'{{queue="{queue["name"]}",status="{s}"}}', queue[s])
              for queue in self._queue_list() for s in (QUEUED, RUNNING)]),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value}" for labels, value in samples]
        waits, runs = self.runner.histograms()
        for name, text, histograms, labels in (
            ("queue_tool_job_wait_seconds", "Seconds from a job's run_at to its start, here.",
             waits, ("queue",)),
            ("queue_tool_job_run_seconds", "Seconds one run took here, by how it ended.",
             runs, ("queue", "status")),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram",
                      *histograms.samples(name, labels)]
        body = ("\n".join(lines) + "\n").encode()
        return 200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], body

    def get_dashboard(self, environ):
        """The live page for operators: 200 HTML under a nonce-based CSP."""
        nonce = secrets.token_urlsafe(16)
        base = html.escape(environ.get("SCRIPT_NAME", "").rstrip("/"), quote=True)
        page = DASHBOARD_HTML.replace("__NONCE__", nonce).replace("__BASE__", base)
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
                  " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
                  " frame-ancestors 'none'")
        return 200, [("Content-Type", "text/html; charset=utf-8"),
                     ("Content-Security-Policy", policy),
                     ("Referrer-Policy", "no-referrer")], page.encode()

    def get_openapi(self, environ):
        """The OpenAPI 3.1 document of every route: 200."""
        if self._openapi is None:
            self._openapi = json_body(openapi_document(self.schema, self.settings))
        return 200, [("Content-Type", "application/json")], self._openapi


# -- Wiring ------------------------------------------------------------------

# The fields a log record may carry (as `extra`), which the JSON lines show.
LOG_FIELDS = ("token", "attempt", "status", "queue", "method", "path", "duration_ms")


class JsonFormatter(logging.Formatter):
    """--log-format json: one JSON object per line, with `time`, `level`, `message`
    and the event's fields (LOG_FIELDS), `child` under a supervisor, `exception`
    with a traceback, and `logger` for a record not of queue_tool's own."""

    def __init__(self, child=None):
        super().__init__()
        self.child = child

    def format(self, record):
        event = {"time": iso_time(record.created), "level": record.levelname.lower(),
                 "message": record.getMessage()}
        for name in LOG_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                event[name] = value
        if self.child is not None:
            event["child"] = self.child
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.name != log.name:
            event["logger"] = record.name
        return json.dumps(event, ensure_ascii=False, default=str)


def log_handler(settings, child=None):
    """A stderr handler formatting as `log_format` says."""
    handler = logging.StreamHandler(sys.stderr)
    who = "" if child is None else f"[child {child}] "
    handler.setFormatter(JsonFormatter(child) if settings.log_format == "json" else
                         logging.Formatter(f"%(asctime)s %(levelname)s {who}%(message)s"))
    return handler


def log_level(settings):
    return logging.DEBUG if settings.debug else getattr(logging, settings.log_level.upper())


def make_app(settings=None, process=None, **overrides):
    """Build the service: App(settings) with its store and Runner.

    `settings` is a Settings record; keyword overrides are setting names
    (make_app(db="jobs.sqlite3", workers=2)). `process(job)` runs each job: a
    callable, or a "module:function" string like the setting (default: wait
    `valor` seconds). Raises SettingsError or StoreError.
    """
    if isinstance(process, str):
        overrides["process"], process = process, None
    settings = Settings(**overrides) if settings is None else dataclasses.replace(
        settings, **overrides)
    if process is None:
        process = wait_valor if settings.process is None else load_process(settings.process)
    store = open_store(settings.db, settings.workers, settings.pooler, settings.listen_db,
                       settings.store_timeout)
    runner = Runner(store, process, workers=settings.workers,
                    lease=settings.lease, max_attempts=settings.max_attempts,
                    retention=settings.retention, grace=settings.grace,
                    queues=settings.queues and settings.queues.split(","),
                    retry_delay=settings.retry_delay, max_delay=settings.max_delay,
                    retries=settings.retries, timeout=settings.timeout, http=True)
    service = App(settings, store, runner)
    if settings.schedules is not None:
        try:
            service.put_schedules(load_schedules(settings.schedules, service.validator,
                                                 service.fast_check))
        except BaseException:
            store.close()
            raise
    return service


class EnvApp:
    """The module-level `app`: built from QUEUE_TOOL_* variables on first use.

    Building it lazily keeps `import queue_tool` free of side effects, and a
    bad variable cannot raise at import: it is logged once, and every request
    then answers 500 misconfigured. A database that cannot be reached is not a
    verdict: that request answers 503 and the next one tries again.
    """

    def __init__(self, environ=None):
        self._environ = environ
        self._lock = threading.Lock()  # guards building self._app once
        self._app = self._error = None

    def _build(self):
        with self._lock:
            if self._app is None and self._error is None:
                try:
                    settings = settings_from_env(self._environ)
                    self._log_as(settings)
                    self._app = make_app(settings)
                except SettingsError as exc:
                    self._error = str(exc)
                    log.error("queue_tool is misconfigured: %s", exc)
                except StoreError as exc:
                    log.error("queue_tool cannot open its store yet: %s", exc)
        return self._app

    def _log_as(self, settings):
        """Under a WSGI host, whose logging this leaves alone otherwise: queue_tool's
        records from the level QUEUE_TOOL_LOG_LEVEL (or --debug) names, and with
        QUEUE_TOOL_LOG_FORMAT=json as JSON lines on stderr of their own."""
        environ = os.environ if self._environ is None else self._environ
        if ENV_PREFIX + "LOG_LEVEL" in environ or settings.debug:
            log.setLevel(log_level(settings))
        if settings.log_format == "json" and not any(
                isinstance(handler.formatter, JsonFormatter) for handler in log.handlers):
            log.addHandler(log_handler(settings))
            log.propagate = False

    def __call__(self, environ, start_response):
        app = self._app or self._build()
        if app is not None:
            return app(environ, start_response)
        error = store_unavailable() if self._error is None else ApiError(
            500, "misconfigured", f"the service is misconfigured: {self._error}")
        return respond(start_response, *error_response(error))

    def start(self):
        """Start the worker threads now (e.g. from a gunicorn post_fork hook)."""
        app = self._app or self._build()
        if app is not None:
            app.start()

    def close(self, grace=None):
        return [] if self._app is None else self._app.close(grace)


app = EnvApp()


# -- Python client ------------------------------------------------------------

class ClientError(Exception):
    """A refusal from the service: the HTTP `status`, the `error` code and its message."""

    def __init__(self, status, error, message):
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message = status, error, message


class Client:
    """A client of this service's HTTP API, standard library only.

        client = queue_tool.Client("http://127.0.0.1:8000", api_key=None)
        batch = client.submit([{"item": "a", "valor": 1}])
        done = client.wait([entry["hash"] for entry in batch["processing_items"]], 60)

    It keeps its connection open where the server offers keep-alive. submit()
    sends an Idempotency-Key (its own, or a new one) and retries a transport
    error or a 503 with that key, so a retried batch is queued once. One Client
    per thread.
    """

    def __init__(self, url, api_key=None, timeout=30, retries=5):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http:// or https:// with a host, not {url!r}")
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout, self.retries = timeout, retries
        self._conn = None
        self._opened = 0  # connections made, so keep-alive can be seen working

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(self, method, path, payload=None, headers=(), wait=0.0):
        """(status, headers, JSON body) of one exchange; OSError/HTTPException as raised."""
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._host, self._port, timeout=self.timeout)
            self._opened += 1
        body = None if payload is None else json.dumps(payload).encode()
        sent = {**self._headers, **dict(headers)}
        if body is not None:
            sent["Content-Type"] = "application/json"
        try:
            self._conn.timeout = self.timeout + wait  # a long poll holds the answer back
            if self._conn.sock is not None:
                self._conn.sock.settimeout(self._conn.timeout)
            self._conn.request(method, self._base + path, body=body, headers=sent)
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        try:
            value = json.loads(data) if data else None
        except ValueError:  # not this service's answer: a proxy's page, say
            value = {"error": f"http_{response.status}",
                     "message": data[:200].decode("utf-8", "replace")}
        return response.status, response.headers, value

    def _call(self, method, path, payload=None, wait=0.0):
        """The JSON of a 200 (or 201) answer; ClientError otherwise. A kept-alive
        connection the server has closed meanwhile is retried once on a new one."""
        try:
            status, _, value = self._request(method, path, payload, wait=wait)
        except (ConnectionError, http.client.RemoteDisconnected):
            status, _, value = self._request(method, path, payload, wait=wait)
        if status not in (200, 201):
            raise ClientError(status, value["error"], value["message"])
        return value

    def submit(self, items, idempotency_key=None):
        """Queue a batch: the 202 body (processing_items, batch, check_batch)."""
        key, attempt = idempotency_key or secrets.token_hex(16), 0
        while True:
            pause = min(0.25 * 2 ** attempt, 8.0)
            try:
                status, headers, value = self._request("POST", "/api", items,
                                                       {"Idempotency-Key": key})
            except (OSError, http.client.HTTPException):
                if attempt == self.retries:
                    raise
            else:
                if status == 202:
                    return value
                if status != 503 or attempt == self.retries:
                    raise ClientError(status, value["error"], value["message"])
                after = headers.get("Retry-After", "")
                pause = float(after) if after.isdigit() else pause
            time.sleep(pause)
            attempt += 1

    def check(self, token):
        return self._call("GET", f"/check/{token}")

    def wait(self, token_or_tokens, timeout):
        """The job (or jobs, for a list) once final or after `timeout` seconds."""
        if not isinstance(token_or_tokens, str):
            deadline = time.monotonic() + timeout
            return [self.wait(token, max(0.0, deadline - time.monotonic()))
                    for token in token_or_tokens]
        return self._hold(f"/check/{token_or_tokens}", timeout,
                          lambda job: job["status"] in FINAL_STATES)

    def cancel(self, token):
        return self._call("DELETE", f"/check/{token}")

    def retry(self, token):
        """Put a failed or canceled job back in the queue: its view."""
        return self._call("POST", f"/check/{token}/retry")

    def retry_jobs(self, status=None, queue=None):
        """Retry every failed and canceled job (or those of `status`), of `queue`: how many."""
        return self._bulk("/jobs/retry", status, queue)

    def cancel_jobs(self, status=None, queue=None):
        """Cancel every queued and running (or `status`) job, of `queue`: how many."""
        return self._bulk("/jobs/cancel", status, queue)

    def _bulk(self, path, status, queue):
        query = urllib.parse.urlencode([(name, value) for name, value in (
            ("status", status), ("queue", queue)) if value is not None])
        return self._call("POST", f"{path}?{query}" if query else path)["count"]

    def batch(self, batch_id, wait=None):
        """The batch view; with `wait`, once every job is final or `wait` seconds pass."""
        if wait is None:
            return self._call("GET", f"/batch/{batch_id}")
        return self._hold(f"/batch/{batch_id}", wait, lambda batch: batch["finished"])

    def cancel_batch(self, batch_id):
        return self._call("DELETE", f"/batch/{batch_id}")

    def jobs(self, status=None, queue=None):
        """Every job, newest first, page after page."""
        query = {"limit": str(MAX_LIMIT[1])}
        query.update((name, value) for name, value in (("status", status), ("queue", queue))
                     if value is not None)
        while True:
            page = self._call("GET", "/jobs?" + urllib.parse.urlencode(query))
            yield from page["jobs"]
            if page["next"] is None:
                return
            query["before"] = page["next"]

    def schedules(self):
        """Every schedule's view, by name."""
        return self._call("GET", "/schedules")["schedules"]

    def schedule(self, name):
        return self._call("GET", f"/schedules/{urllib.parse.quote(name)}")

    def put_schedule(self, name, job, cron=None, every=None, timezone=None, paused=False):
        """Create or replace a schedule (exactly one of `cron` and `every`): its view."""
        body = {"job": job, "paused": paused}
        body.update((key, value) for key, value in (
            ("cron", cron), ("every", every), ("timezone", timezone)) if value is not None)
        return self._call("PUT", f"/schedules/{urllib.parse.quote(name)}", body)

    def delete_schedule(self, name):
        """Remove a schedule: its last view."""
        return self._call("DELETE", f"/schedules/{urllib.parse.quote(name)}")

    def queues(self):
        """Every queue's view, by name."""
        return self._call("GET", "/queues")["queues"]

    def workers(self):
        """The processes of the fleet (GET /workers), alive ones first."""
        return self._call("GET", "/workers")["processes"]

    def queue(self, name):
        return self._call("GET", f"/queues/{urllib.parse.quote(name)}")

    def set_queue(self, name, **settings):
        """Change a queue's settings (paused, concurrency, rate; None removes a limit):
        its view. set_queue("mail", rate={"limit": 10, "per": 1}), say."""
        return self._call("PATCH", f"/queues/{urllib.parse.quote(name)}", settings)

    def _hold(self, path, timeout, final):
        """GET `path` with ?wait= (30 s at a time) until final(value) or `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining < 0.001:
                return self._call("GET", path)
            wait = min(remaining, MAX_WAIT)
            value = self._call("GET", f"{path}?wait={wait:.3f}", wait=wait)
            if final(value):
                return value


# -- Built-in server ---------------------------------------------------------

REQUEST_TIMEOUT = 10.0  # seconds a request's head, and then its body, may take to arrive
MAX_HEAD = 65536  # bytes of a request line and its headers
REQUEST_THREADS = 64  # the built-in server's threads that run requests (a long poll holds one)
ACCEPT_PAUSE = 0.5  # seconds the server stops accepting when it runs out of descriptors


class _Connection:
    """One client connection of the Server: what it sent that no request took yet."""

    __slots__ = (
        "address",
        "buffer",
        "deadline",
        "framing",
        "need",
        "sock",
        "state",
    )

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.buffer = sock, address, bytearray()
        self.deadline = deadline  # monotonic time it is closed unless it moves on
        self.state = "new"  # new | idle (kept alive) | head | body | busy (a thread has it)
        self.need = 0  # the bytes its request needs, head and body
        self.framing = None  # (status, error, message) of a request refused as framed


def _framing(head):
    """How a request head says its body ends, as RFC 9112 reads it: (its Content-Length,
    None), or (None, (status, error, message)) for a head to refuse and close on."""
    lengths, chunked = set(), False
    for line in head.split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        if not line:
            continue  # the blank line that ends the head
        if line[:1] in (b" ", b"\t"):
            return None, (400, "invalid_header", "a header line folded onto the next one")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
            return None, (400, "invalid_header",
                          "a header line without a name and a colon right after it")
        name = name.lower()
        if name == b"content-length":
            lengths.update(part.strip() for part in value.split(b","))
        elif name == b"transfer-encoding":
            chunked = True
    if chunked and lengths:
        return None, (400, "invalid_content_length",
                      "both Transfer-Encoding and Content-Length: where the body ends is unclear")
    if chunked:
        return None, (411, "length_required", "send the body with a Content-Length")
    if len(lengths) > 1 or any(not DIGITS_RE.match(length.decode("latin-1"))
                               for length in lengths):
        return None, (400, "invalid_content_length",
                      "Content-Length must be one whole number of bytes")
    return (int(lengths.pop()) if lengths else 0), None


class Server:
    """The built-in HTTP/1.1 server: one selector loop holds every connection and reads
    each request's head and body; a fixed pool of threads runs the requests, one at a
    time per connection, through wsgiref's handler (RequestHandler).

    So an idle or slow client holds no thread: a connection with nothing to say is
    only a socket in the selector, and one sending a byte a second is read by the loop
    until its request is whole (or its REQUEST_TIMEOUT passes: closed). At most
    `max_connections` are open; the next ones wait in the listen backlog. An idle
    kept-alive connection is closed after `keepalive` seconds. The same interface as
    socketserver's servers: serve_forever(), shutdown(), server_close().
    """

    def __init__(self, host, port, app, max_connections=1000, keepalive=5.0, max_body=1 << 20,
                 threads=REQUEST_THREADS):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.app, self.max_connections, self.keepalive = app, max_connections, keepalive
        self.max_body = max_body
        self.base_environ = {"SERVER_NAME": socket.getfqdn(host) if host else "",
                             "GATEWAY_INTERFACE": "CGI/1.1",
                             "SERVER_PORT": str(self.server_address[1]), "REMOTE_HOST": "",
                             "CONTENT_LENGTH": "", "SCRIPT_NAME": ""}
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, "wake")
        self._accepting = False
        self._paused_until = 0.0  # out of descriptors: no accept before then (monotonic)
        self._open = set()  # every connection not closed, busy or not
        self._deadlines = []  # heap of (deadline, n, connection); stale entries skipped
        self._counter = itertools.count()
        self._returned = collections.deque()  # (connection, keep) from the threads
        self._requests = SimpleQueue()  # connections whose request is whole
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._serve_requests, daemon=True,
                                          name=f"queue_tool-http-{n}") for n in range(threads)]
        for thread in self._threads:
            thread.start()

    # The loop.

    def serve_forever(self, poll_interval=0.5):
        self._accept_again()
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                timeout = poll_interval
                if self._deadlines:
                    timeout = min(timeout, max(0.0, self._deadlines[0][0] - now))
                if self._paused_until:
                    timeout = min(timeout, max(0.0, self._paused_until - now))
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    else:
                        self._read(key.data)
                self._expire(time.monotonic())
                if self._paused_until and time.monotonic() >= self._paused_until:
                    self._paused_until = 0.0
                    self._accept_again()
        finally:
            self._done.set()

    def shutdown(self):
        """Stop serve_forever() (from another thread) and wait until it has."""
        self._stopped.set()
        self._wake()
        self._done.wait()

    def server_close(self):
        """Close the listening socket and every connection; the request threads end."""
        self._stopped.set()
        for _ in self._threads:
            self._requests.put(None)
        for connection in list(self._open):
            connection.sock.close()
        self._open.clear()
        self.socket.close()
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()

    def _wake(self):
        try:
            self._wake_out.send(b"x")
        except OSError:  # its buffer is full: the loop wakes anyway
            pass

    def _accept_again(self):
        if (not self._accepting and not self._paused_until
                and len(self._open) < self.max_connections):
            self._selector.register(self.socket, selectors.EVENT_READ, None)
            self._accepting = True

    def _stop_accepting(self):
        if self._accepting:
            self._selector.unregister(self.socket)
            self._accepting = False

    def _accept(self):
        while len(self._open) < self.max_connections:
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the connection stays in the backlog. Accepting
                    # again at once would spin; one closes meanwhile, or the pause ends.
                    log.warning("cannot accept a connection (%s): pausing %gs",
                                exc.strerror, ACCEPT_PAUSE)
                    self._stop_accepting()
                    self._paused_until = time.monotonic() + ACCEPT_PAUSE
                return  # ECONNABORTED and the like: that client is gone
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, address, time.monotonic() + REQUEST_TIMEOUT)
            self._open.add(connection)
            self._selector.register(sock, selectors.EVENT_READ, connection)
            self._expire_at(connection)
        self._stop_accepting()

    def _await(self, connection, state):
        """The connection now waits for a request's head or body: REQUEST_TIMEOUT to go."""
        connection.state = state
        connection.deadline = time.monotonic() + REQUEST_TIMEOUT
        self._expire_at(connection)

    def _expire_at(self, connection):
        heapq.heappush(self._deadlines, (connection.deadline, next(self._counter), connection))

    def _expire(self, now):
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, connection = heapq.heappop(self._deadlines)
            if connection.deadline == deadline and connection.state != "busy" \
                    and connection in self._open:
                self._close(connection)

    def _close(self, connection):
        if connection in self._open:
            self._open.discard(connection)
            if connection.state != "busy":
                self._selector.unregister(connection.sock)
            connection.sock.close()
            self._accept_again()

    def _read(self, connection):
        try:
            data = connection.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection)
            return
        if connection.state in ("new", "idle"):
            self._await(connection, "head")
        connection.buffer += data
        self._advance(connection)

    def _advance(self, connection):
        """Hand the connection's request to a thread once it is whole (or refused)."""
        buffer = connection.buffer
        if connection.state == "head":
            end = buffer.find(b"\r\n\r\n")
            end = end + 4 if end >= 0 else -1
            if end < 0 and buffer.find(b"\n\n") >= 0:  # bare line feeds (RFC 9112 2.2)
                end = buffer.find(b"\n\n") + 2
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    connection.framing = (431, "head_too_large",
                                          f"a request head of more than {MAX_HEAD} bytes")
                    self._dispatch(connection)
                return
            length, connection.framing = _framing(bytes(buffer[:end]))
            if connection.framing or length > self.max_body:
                connection.need = end  # the app refuses it from its head: no body read
                self._dispatch(connection)
                return
            connection.need = end + length
            if len(buffer) < connection.need:
                self._await(connection, "body")
                if b"100-continue" in buffer[:end].lower():
                    try:  # the client waits for this before it sends its body
                        connection.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError:
                        pass
                return
        elif len(buffer) < connection.need:
            return
        self._dispatch(connection)

    def _dispatch(self, connection):
        self._selector.unregister(connection.sock)
        connection.state = "busy"
        self._requests.put(connection)

    def _take_back(self):
        try:
            while self._wake_in.recv(4096):
                pass
        except OSError:
            pass
        while self._returned:
            connection, keep = self._returned.popleft()
            if connection not in self._open:
                continue  # closed by server_close meanwhile
            if not keep:
                self._close(connection)
                continue
            connection.state = "idle"
            connection.deadline = time.monotonic() + self.keepalive
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
            self._expire_at(connection)
            if connection.buffer:  # the next request came with this one (pipelining)
                self._await(connection, "head")
                self._advance(connection)

    # The request threads.

    def _serve_requests(self):
        while (connection := self._requests.get()) is not None:
            keep = False
            try:
                connection.sock.setblocking(True)
                connection.sock.settimeout(REQUEST_TIMEOUT)  # for writing the answer
                keep = self._serve_one(connection)
            except Exception:  # a client gone mid-answer, or a bug: that connection ends
                log.debug("a connection ended in error", exc_info=True)
            if keep:
                try:
                    connection.sock.setblocking(False)
                except OSError:
                    keep = False
            self._returned.append((connection, keep))
            self._wake()

    def _serve_one(self, connection):
        """Answer the request at the start of the connection's buffer: whether the
        connection stays open for the next one."""
        wfile = connection.sock.makefile("wb", RequestHandler.wbufsize)
        try:
            if connection.framing:
                status, error, message = connection.framing
                body = json_body(error_payload(error, message))
                wfile.write(f"HTTP/1.1 {STATUS_LINES[status]}\r\nContent-Type: application/json"
                            f"\r\nContent-Length: {len(body)}\r\nConnection: close"
                            f"\r\n\r\n".encode("latin-1") + body)
                wfile.flush()
                return False
            request = bytes(connection.buffer[:connection.need])
            del connection.buffer[:connection.need]
            handler = RequestHandler(self, connection, io.BytesIO(request), wfile)
            handler.handle_one_request()
            return not handler.close_connection
        finally:
            wfile.close()


class _RequestBody:
    """wsgi.input of one request on a kept-alive connection: it ends at the
    Content-Length, so no read runs into the next request on the connection."""

    def __init__(self, rfile, length):
        self._rfile, self.left, self.broken = rfile, length, False

    def read(self, size=-1):
        return self._take(self._rfile.read, size)

    def readline(self, size=-1):
        return self._take(self._rfile.readline, size)

    def _take(self, read, size):
        size = self.left if size is None or size < 0 else min(size, self.left)
        try:
            data = read(size) if size else b""
        except OSError:  # a timeout, a reset: the connection is done for
            self.broken = True
            raise
        self.left -= len(data)
        if not data and size:
            self.broken = True  # the client hung up before the end of its body
        return data

    def readlines(self, hint=-1):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


class _ServerHandler(wsgiref.simple_server.ServerHandler):
    http_version = "1.1"

    def cleanup_headers(self):
        super().cleanup_headers()
        request = self.request_handler
        if ("Content-Length" not in self.headers  # nothing else marks the end
                or request.body.left > request.drain_limit):  # e.g. a 413: hang up instead
            request.close_connection = True
        if request.close_connection:
            self.headers["Connection"] = "close"

    def handle_error(self):
        self.request_handler.close_connection = True  # a response may be cut short
        super().handle_error()


class RequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    """wsgiref's handler for one request the Server has read whole: HTTP/1.1 with
    keep-alive, so a client that sends request after request (queue_tool.Client, a
    load balancer) reuses its connection."""

    protocol_version = "HTTP/1.1"
    drain_limit = 65536  # the most of an unread body skipped to keep a connection
    # A response goes out in one write, not a send per header line: on a kept-alive
    # connection, small sends meet the client's delayed ACK and wait 40 ms each.
    wbufsize = 65536

    def __init__(self, server, connection, rfile, wfile):  # not socketserver's
        self.server, self.request = server, connection.sock
        self.client_address = connection.address
        self.rfile, self.wfile = rfile, wfile
        self.close_connection = True

    def handle_expect_100(self):
        return True  # the Server sent "100 Continue" when it waited for the body

    def handle_one_request(self):
        self.raw_requestline = self.rfile.readline(65537)
        if not self.parse_request():
            return  # an error was sent, and the connection is to close
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if self.request_version != "HTTP/1.1":
            self.close_connection = True
        self.body = _RequestBody(self.rfile, int(length))  # the Server checked it
        handler = _ServerHandler(self.body, self.wfile, self.get_stderr(), self.get_environ(),
                                 multithread=True)
        handler.request_handler = self
        handler.run(self.server.app)
        if self.body.left and not self.close_connection:
            self.body.read()  # what the app left unread, so the next request starts clean
        if self.body.broken or self.body.left:
            self.close_connection = True  # its body was not read: where it ends is unknown
        self.wfile.flush()

    def get_environ(self):
        environ = super().get_environ()
        if self.headers.get("Content-Type") is None:
            del environ["CONTENT_TYPE"]  # wsgiref would claim text/plain
        return environ

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)  # App logs each request


# -- Command line ------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="queue_tool", description="A tiny durable job-queue service.",
        usage="%(prog)s [-h] [--version] [worker] [--SETTING VALUE ...]",
        epilog=f"Each flag can also be set as a {ENV_PREFIX}* variable, e.g. "
               f"{ENV_PREFIX}MAX_QUEUED; flags win.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("command", nargs="?", choices=("serve", "worker"), default="serve",
                        help="serve: HTTP and workers (the default); worker: workers only")
    parser.add_argument("--processes", type=_processes, metavar="N",
                        help="worker only: N worker processes (each with --workers threads)"
                             " under a supervisor that restarts any that dies")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # from the supervisor
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", default=None,
                                help=SETTING_HELP[field.name])
            continue
        default = "none" if field.default is None else field.default
        parser.add_argument(flag, type=_flag_type(field.name), metavar=field.name.upper(),
                            help=f"{SETTING_HELP[field.name]} (default: {default})")
    return parser


def _flag_type(name):
    def convert(text):
        try:
            value = parse_setting(name, text)
            _check_setting(name, value)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    convert.__name__ = name
    return convert


def _processes(text):
    if not DIGITS_RE.match(text.strip()) or not 1 <= int(text) <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"processes must be a whole number from 1 to"
                                         f" {MAX_PROCESSES}, not {text!r}")
    return int(text)


MAX_PROCESSES = 256


def main(argv=None):
    """Serve (or with `worker`, only work) until SIGINT or SIGTERM; the exit status
    (2 for a bad setting or a database that cannot be used)."""
    parser = build_parser()
    try:
        flags = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag already reported
        return exc.code
    command, processes, child = flags.command, flags.processes, flags.child
    overrides = {name: value for name, value in vars(flags).items()
                 if value is not None and name not in ("command", "processes", "child")}
    try:
        settings = settings_from_env(**overrides)
        if command == "worker" and settings.workers == 0:
            raise SettingsError("worker runs jobs: it needs --workers 1 or more")
        if processes is not None and command != "worker":
            raise SettingsError("--processes is for the worker command")
        service = make_app(settings)
    except (SettingsError, StoreError) as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level(settings), handlers=[log_handler(settings, child)])
    # The pool's own reconnection notes repeat what the service logs in one line.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    if processes is not None:
        service.close(grace=0)  # the schema is set up, the settings work: the children work
        return Supervisor(processes, overrides, settings.grace).run()
    if command == "worker":
        service.runner.restart_stuck, service.runner.http = child is not None, False
        return _work(service, settings)
    try:
        server = Server(settings.host, settings.port, service, settings.max_connections,
                        settings.keepalive, settings.max_body)
    except OSError as exc:
        service.close(grace=0)
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: cannot listen on {settings.host}:{settings.port}:"
              f" {exc.strerror or exc}", file=sys.stderr)
        return 2
    service.start()  # queued jobs resume now, not on the first request
    host, port = server.server_address[:2]
    log.info("queue_tool %s serving on http://%s:%d (db %s, %d workers)",
             __version__, host, port, redact(settings.db), settings.workers)
    with _signals_call(lambda: threading.Thread(target=server.shutdown, daemon=True).start()):
        try:
            server.serve_forever(poll_interval=0.2)
        finally:
            server.server_close()
            _stop(service)
    return 0


def _work(service, settings):
    """`queue-tool worker`: run jobs, serve nothing, until SIGINT or SIGTERM."""
    stopped = threading.Event()
    with _signals_call(stopped.set):
        service.start()
        log.info("queue_tool %s working (db %s, %d workers, no HTTP)",
                 __version__, redact(settings.db), settings.workers)
        while not stopped.wait(0.5):
            pass
        _stop(service)
    return 0


class Supervisor:
    """`worker --processes N`: N worker processes (this module run again, as `worker
    --child n`), each started again when it ends, after a backoff that doubles
    while it keeps ending within a minute; SIGTERM or SIGINT is passed on to all,
    and they get their grace (and 10 s more) before they are killed."""

    backoff, max_backoff, steady = 0.5, 30.0, 60.0  # seconds
    look = 0.1  # seconds between looks at the children

    def __init__(self, count, overrides, grace):
        self.count, self.grace = count, grace
        self.args = []
        for name, value in overrides.items():
            flag = "--" + name.replace("_", "-")
            self.args += [flag] if value is True else [] if value is False else [flag, str(value)]
        self.children = {}  # n -> (Popen, monotonic start)
        self.failures = collections.Counter()  # n -> quick ends in a row
        self.due = {}  # n -> monotonic time to start it again

    def run(self):
        stopping = threading.Event()
        with _signals_call(stopping.set):
            log.info("queue_tool %s supervising %d worker processes", __version__, self.count)
            for n in range(1, self.count + 1):
                self._start(n)
            while not stopping.wait(self.look):
                self._look()
            self._stop_all()
        return 0

    def _start(self, n):
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker",
                                  "--child", str(n), *self.args])
        self.children[n] = (child, time.monotonic())
        log.info("child %d started (pid %d)", n, child.pid)

    def _look(self):
        now = time.monotonic()
        for n, (child, started) in list(self.children.items()):
            status = child.poll()
            if status is None:
                continue
            del self.children[n]
            self.failures[n] = self.failures[n] + 1 if now - started < self.steady else 0
            wait = min(self.backoff * 2 ** (self.failures[n] - 1), self.max_backoff) \
                if self.failures[n] else 0.0
            how = f"was killed by {signal.Signals(-status).name}" if status < 0 \
                else f"exited with status {status}"
            log.warning("child %d (pid %d) %s; starting it again in %gs", n, child.pid, how,
                        wait)
            self.due[n] = now + wait
        for n, when in list(self.due.items()):
            if when <= now:
                del self.due[n]
                self._start(n)

    def _stop_all(self):
        for n, (child, _) in self.children.items():
            log.info("stopping child %d (pid %d)", n, child.pid)
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 10
        for n, (child, _) in self.children.items():
            try:
                status = child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("child %d (pid %d) did not stop in time; killing it", n, child.pid)
                child.kill()
                status = child.wait()
            log.info("child %d (pid %d) stopped (status %d)", n, child.pid, status)


@contextlib.contextmanager
def _signals_call(stop):
    """Call `stop()` on SIGINT or SIGTERM while inside; the old handlers after."""
    def handle(signum, frame):
        log.info("%s received; stopping", signal.Signals(signum).name)
        stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(service):
    requeued = service.close()
    log.info("stopped; %d unfinished jobs put back in the queue", len(requeued))


# -- The page ----------------------------------------------------------------

# The page at GET /: inline CSS and JavaScript, no external asset. Every job field
# is rendered with textContent, never as HTML, and the Content-Security-Policy
# admits only the inline blocks carrying this response's nonce.
DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>queue_tool</title>
<link rel="icon" href="data:,">
<style nonce="__NONCE__">
:root { --fg: #1d232a; --muted: #5d6873; --line: #d8dee4; --bg: #f6f8fa; --accent: #0a58ca;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); }
body { margin: 0 auto; max-width: 1100px; padding: 12px 16px 40px; background: #fff; }
header { display: flex; align-items: baseline; gap: 12px; flex-wrap: wrap; }
h1 { font-size: 1.4rem; margin: 8px 0; } h2 { font-size: 1.1rem; margin: 22px 0 8px; }
.muted { color: var(--muted); } .error { color: #a4161a; }
section { border-top: 1px solid var(--line); }
#counts { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: 8px;
  border: 0; margin-top: 8px; }
.count { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px; }
.count strong { display: block; font-size: 1.5rem; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: .85rem;
  font-weight: 600; border: 1px solid transparent; white-space: nowrap; }
.badge.queued { background: #eef1f4; color: #38424c; border-color: #c9d1d9; }
.badge.running { background: #ddeeff; color: #0b4a9c; border-color: #9cc5f5; }
.badge.done { background: #dcf5e3; color: #11622d; border-color: #8fd3a5; }
.badge.failed { background: #fde2e1; color: #8a1414; border-color: #f1a3a0; }
.badge.canceled { background: #fff1d6; color: #7a4b00; border-color: #eac37a; }
button { font: inherit; padding: 4px 10px; border: 1px solid var(--line); border-radius: 6px;
  background: #fff; cursor: pointer; } button:hover { border-color: var(--accent); }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
input, select, textarea { font: inherit; padding: 4px 6px; border: 1px solid var(--line);
  border-radius: 6px; box-sizing: border-box; }
.row { display: flex; gap: 6px; margin-bottom: 6px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 12px; }
.chart { width: 100%; height: auto; background: var(--bg); border: 1px solid var(--line);
  border-radius: 8px; display: block; }
.chart .grid { stroke: var(--line); } .chart .base { stroke: #9aa5b1; }
.chart text { font-size: 13px; fill: var(--muted); } figure { margin: 0; } .chart polyline { fill: none; stroke-width: 2; }
.chart .finished { stroke: #11622d; } .chart .queued { stroke: var(--accent); }
.key { display: inline-block; width: 14px; height: 4px; vertical-align: middle; }
.key.finished { background: #11622d; } .key.queued { background: var(--accent); }
.legend { display: flex; gap: 18px; flex-wrap: wrap; margin: 6px 0; }
.badge.alive { background: #dcf5e3; color: #11622d; border-color: #8fd3a5; }
.badge.gone, .badge.paused { background: #fff1d6; color: #7a4b00; border-color: #eac37a; }
.badge.active { background: #eef1f4; color: #38424c; border-color: #c9d1d9; }
.panel-note { margin: 4px 0; }
#detail { background: var(--bg); border: 1px solid var(--line); border-radius: 8px;
  padding: 4px 12px 10px; margin-top: 14px; }
#detail dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; }
#detail dt { color: var(--muted); } #detail dd { margin: 0; overflow-wrap: anywhere; }
#detail pre { margin: 0; white-space: pre-wrap; font-family: ui-monospace, monospace; }
#detail-jobs li { margin: 2px 0; } tr.clickable { cursor: pointer; }
tr.clickable:hover td { background: var(--bg); }
fieldset { border: 1px solid var(--line); border-radius: 8px; display: flex; flex-wrap: wrap;
  gap: 8px 14px; margin: 8px 0; } fieldset input { width: 7em; }
.row .item { flex: 1 1 auto; min-width: 0; } .row .valor { width: 7.5em; }
textarea { width: 100%; font-family: ui-monospace, monospace; }
.actions { display: flex; gap: 8px; flex-wrap: wrap; margin: 8px 0; }
#results { padding-left: 1.4em; } #results li { margin: 2px 0; overflow-wrap: anywhere; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 6px; border-bottom: 1px solid var(--line); vertical-align: top; }
td.item { overflow-wrap: anywhere; max-width: 28em; min-width: 9em; }
code { font-family: ui-monospace, monospace; font-size: .9em; }
progress { width: 7em; vertical-align: middle; }
.toolbar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
@media (max-width: 700px) {
  thead { display: none; }
  table, tbody, tr, td { display: block; width: 100%; box-sizing: border-box; }
  tr { border: 1px solid var(--line); border-radius: 8px; margin-bottom: 8px; padding: 4px; }
  td { border: 0; padding: 3px 6px; } td:empty { display: none; }
  td[data-label]::before { content: attr(data-label) ": "; color: var(--muted); }
}
</style>
</head>
<body data-base="__BASE__">
<header><h1>queue_tool</h1><span id="status" class="muted">connecting</span></header>
<form id="key-form" hidden>
  <p>This service needs its API key to list, submit, cancel and retry jobs and to steer its
    queues and schedules. The page keeps it in memory only: a reload asks again.</p>
  <div class="actions"><input id="key" type="password" autocomplete="off" aria-label="API key"
    placeholder="API key"><button class="primary">Use key</button></div>
</form>
<section id="counts" aria-label="Jobs by status">
  <div class="count"><span class="badge queued">Na fila</span><strong id="n-queued">-</strong>queued now</div>
  <div class="count"><span class="badge running">Em processamento</span><strong id="n-running">-</strong>running now</div>
  <div class="count"><span class="badge done">Finalizado</span><strong id="n-done">-</strong>done, all time</div>
  <div class="count"><span class="badge failed">Falhou</span><strong id="n-failed">-</strong>failed, all time</div>
  <div class="count"><span class="badge canceled">Cancelado</span><strong id="n-canceled">-</strong>canceled, all time</div>
  <div class="count"><span class="muted">workers</span><strong id="n-workers">-</strong>in this process</div>
  <div class="count"><span class="muted">processes</span><strong id="n-processes">-</strong>alive in the fleet</div>
</section>
<section id="activity" aria-label="Activity over the last five minutes">
  <h2>Last five minutes</h2>
  <div class="charts">
    <figure>
      <svg id="chart-finished" class="chart" viewBox="0 0 600 170" role="img"
        aria-label="jobs finished per second, each second">
        <g class="axes"></g><polyline id="line-finished" class="finished" points=""></polyline>
      </svg>
      <figcaption class="legend"><span><span class="key finished"></span> finished per second:
        <strong id="rate-now">-</strong> (peak <span id="rate-max">-</span>)</span></figcaption>
    </figure>
    <figure>
      <svg id="chart-queued" class="chart" viewBox="0 0 600 170" role="img"
        aria-label="jobs queued, each second">
        <g class="axes"></g><polyline id="line-queued" class="queued" points=""></polyline>
      </svg>
      <figcaption class="legend"><span><span class="key queued"></span> queued:
        <strong id="depth-now">-</strong> (peak <span id="depth-max">-</span>)</span></figcaption>
    </figure>
  </div>
</section>
<section id="fleet-panel" aria-label="The processes of the fleet">
  <h2>Processes</h2>
  <p id="fleet-note" class="muted panel-note"></p>
  <table><thead><tr><th>Host</th><th>Pid</th><th>Role</th><th>Workers</th><th>Busy</th>
    <th>Queues</th><th>Heartbeat</th><th>State</th></tr></thead><tbody id="fleet"></tbody></table>
</section>
<section id="queues-panel" aria-label="Queues">
  <h2>Queues</h2>
  <p id="queues-note" class="muted panel-note"></p>
  <table><thead><tr><th>Queue</th><th>Queued</th><th>Running</th><th>Concurrency</th>
    <th>Rate</th><th>State</th><th></th></tr></thead><tbody id="queues"></tbody></table>
</section>
<section id="schedules-panel" aria-label="Schedules">
  <h2>Schedules</h2>
  <p id="schedules-note" class="muted panel-note"></p>
  <table><thead><tr><th>Schedule</th><th>Timing</th><th>Next run</th><th>Last job</th>
    <th>State</th><th></th></tr></thead><tbody id="schedules"></tbody></table>
</section>
<section id="failed-panel" aria-label="Failed jobs">
  <h2>Failed jobs</h2>
  <div class="toolbar"><button type="button" id="retry-all">Retry all shown</button>
    <span id="failed-note" class="muted"></span></div>
  <table><thead><tr><th>Token</th><th>Item</th><th>Queue</th><th>Attempts</th><th>Error</th>
    <th>Finished</th><th></th></tr></thead><tbody id="failed"></tbody></table>
</section>
<section>
  <h2>Submit a batch</h2>
  <form id="batch-form">
    <div id="rows"></div>
    <div class="actions"><button type="button" id="add-row">Add item</button></div>
    <fieldset id="options"><legend>Options for every item above (all optional)</legend>
      <label>Delay (s) <input id="opt-delay" type="number" min="0" step="any"></label>
      <label>Priority <input id="opt-priority" type="number" min="-10" max="10" step="1"
        placeholder="0"></label>
      <label>Queue <input id="opt-queue" placeholder="default" autocomplete="off"></label>
      <label>Retries <input id="opt-retries" type="number" min="0" max="25" step="1"></label>
    </fieldset>
    <details><summary>or paste a JSON array</summary>
      <textarea id="batch-json" rows="4" aria-label="batch as JSON"
        placeholder='[{"item": "Teste", "valor": 1}]'></textarea></details>
    <div class="actions"><button class="primary" id="send">Submit</button></div>
  </form>
  <ol id="results" aria-live="polite"></ol>
</section>
<section id="detail" hidden aria-live="polite">
  <div class="toolbar"><h2 id="detail-title">Job</h2>
    <button type="button" id="detail-close">Close</button></div>
  <dl id="detail-fields"></dl>
  <ol id="detail-jobs"></ol>
</section>
<section>
  <h2>Latest jobs</h2>
  <div class="toolbar">
    <label>Status <select id="filter"><option value="">all</option><option>queued</option>
      <option>running</option><option>done</option><option>failed</option><option>canceled</option>
    </select></label>
    <button type="button" id="newest">Newest</button>
    <button type="button" id="next">Next page</button>
    <span id="jobs-note" class="muted"></span>
  </div>
  <table><thead><tr><th>Token</th><th>Item</th><th>Valor</th><th>Status</th><th>Queue</th>
    <th>Priority</th><th>Attempts</th><th>Starts</th><th>Finished</th>
    <th>Progress</th><th></th></tr></thead><tbody id="jobs"></tbody></table>
</section>
<script nonce="__NONCE__">
"use strict";
const base = document.body.dataset.base;
const $ = (id) => document.getElementById(id);
let key = "";  // the API key: in this page's memory only, asked for once
let keyAsked = [];  // actions waiting for the key
let before = null, next = null, busy = false;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}
// One call of the API. An action refused for want of the key (401) asks for it, once,
// then goes again with it; a refresh refused only shows the form.
async function api(method, path, body, contentType) {
  for (let again = false; ; again = true) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = contentType || "application/json";
    if (key) headers["Authorization"] = "Bearer " + key;
    const response = await fetch(base + path, {method, headers, body, cache: "no-store"});
    const text = await response.text();
    let data = text;
    try { data = JSON.parse(text); } catch (e) { /* /metrics is text */ }
    if (response.status === 401) {
      $("key-form").hidden = false;
      if (method !== "GET" && !again) {
        await new Promise((resolve) => keyAsked.push(resolve));
        continue;
      }
    }
    return {status: response.status, data};
  }
}
function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
function ago(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return seconds < 90 ? Math.round(seconds) + " s ago" : Math.round(seconds / 60) + " min ago";
}
function button(text, action) {
  const node = el("button", text);
  node.type = "button";
  node.addEventListener("click", async () => {
    node.disabled = true;
    try { await action(); } finally { node.disabled = false; refresh(); }
  });
  return node;
}
function tableRow(cells) {
  const row = el("tr");
  for (const [label, content] of cells) {
    const td = el("td");
    if (label) td.dataset.label = label;
    if (content instanceof Node) td.append(content); else td.textContent = content;
    row.append(td);
  }
  return row;
}
function fill(bodyId, noteId, answer, rows, empty) {
  if (answer.status !== 200) {
    $(bodyId).replaceChildren();
    $(noteId).textContent = answer.status === 401 ? "The API key is needed to see this."
      : (answer.data.message || "cannot read this: " + answer.status);
    return;
  }
  $(noteId).textContent = rows.length ? "" : empty;
  $(bodyId).replaceChildren(...rows);
}

async function refreshCounts() {
  const health = await api("GET", "/health");
  if (health.status === 200) {
    for (const name of ["queued", "running", "workers"]) $("n-" + name).textContent = health.data[name];
  }
  const metrics = await api("GET", "/metrics");
  let finished = null;
  if (metrics.status === 200) {
    finished = 0;
    for (const state of ["done", "failed", "canceled"]) {
      const match = metrics.data.match(new RegExp('^queue_tool_jobs_finished_total\\{status="' + state + '"\\} (\\d+)$', "m"));
      if (match) { $("n-" + state).textContent = match[1]; finished += Number(match[1]); }
    }
  }
  sample(health.status === 200 ? health.data.queued : null, finished);
}

// The charts: one sample a second for five minutes, from what /health and /metrics
// already say; each has its own scale, marked on its axis.
const samples = [], WIDTH = 600, LEFT = 52, TOP = 10, BASE = 140, SPAN = 300;
let lastFinished = null, lastTime = null;
function sample(queued, finished) {
  const now = performance.now() / 1000;
  let rate = null;
  if (finished !== null && lastFinished !== null && now > lastTime) {
    rate = Math.max(0, (finished - lastFinished) / (now - lastTime));
  }
  if (finished !== null) { lastFinished = finished; lastTime = now; }
  samples.push({rate, queued});
  if (samples.length > SPAN) samples.shift();
  drawCharts();
}
function niceTop(peak) {  // the smallest 1, 2 or 5 times a power of ten at or above peak
  if (!(peak > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(peak)));
  return [1, 2, 5, 10].map((n) => n * power).find((n) => n >= peak * 0.9999);
}
function svg(tag, attributes, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}
function number(value) {
  return value >= 1e6 ? (value / 1e6) + "M" : value >= 1e4 ? (value / 1e3) + "k" : String(value);
}
function drawChart(chart, line, values) {
  const known = values.filter((v) => v !== null), peak = Math.max(0, ...known), top = niceTop(peak);
  const step = (WIDTH - LEFT - 8) / (SPAN - 1), axes = [];
  for (const fraction of [0, 0.5, 1]) {
    const y = BASE - fraction * (BASE - TOP), value = Math.round(top * fraction * 1000) / 1000;
    axes.push(svg("line", {class: fraction ? "grid" : "base", x1: LEFT, y1: y, x2: WIDTH - 8, y2: y}),
              svg("text", {x: LEFT - 6, y: y + 4, "text-anchor": "end"}, number(value)));
  }
  for (let minutes = 0; minutes <= 5; minutes++) {
    const x = WIDTH - 8 - minutes * 60 * step;
    axes.push(svg("text", {x, y: BASE + 18, "text-anchor": minutes ? "middle" : "end"},
                  minutes ? "-" + minutes + " min" : "now"));
  }
  if (!known.length || peak === 0) {
    axes.push(svg("text", {x: (LEFT + WIDTH) / 2, y: (TOP + BASE) / 2, "text-anchor": "middle"},
                  known.length ? "nothing yet in five minutes" : "waiting for the first sample"));
  }
  chart.querySelector(".axes").replaceChildren(...axes);
  const out = [];
  values.forEach((v, i) => {
    if (v === null) return;
    const x = WIDTH - 8 - (values.length - 1 - i) * step, y = BASE - (v / top) * (BASE - TOP);
    out.push(x.toFixed(1) + "," + y.toFixed(1));
  });
  line.setAttribute("points", out.join(" "));
  return {peak, now: known.length ? known[known.length - 1] : null};
}
function drawCharts() {
  const rate = drawChart($("chart-finished"), $("line-finished"), samples.map((s) => s.rate));
  const depth = drawChart($("chart-queued"), $("line-queued"), samples.map((s) => s.queued));
  $("rate-now").textContent = rate.now === null ? "-" : rate.now.toFixed(1);
  $("rate-max").textContent = rate.peak.toFixed(1);
  $("depth-now").textContent = depth.now === null ? "-" : depth.now;
  $("depth-max").textContent = depth.peak;
}

// The panels: the fleet, the queues, the schedules, the failed jobs.
async function refreshFleet() {
  const answer = await api("GET", "/workers");
  const processes = answer.status === 200 ? answer.data.processes : [];
  $("n-processes").textContent = answer.status === 200 ? processes.filter((p) => p.alive).length : "-";
  fill("fleet", "fleet-note", answer, processes.map((p) => tableRow([
    ["Host", p.host], ["Pid", p.pid], ["Role", p.http ? "serves and works" : "works"],
    ["Workers", p.workers], ["Busy", p.busy], ["Queues", p.queues ? p.queues.join(", ") : "every"],
    ["Heartbeat", ago(p.heartbeat_at)],
    ["State", el("span", p.alive ? "alive" : "gone", "badge " + (p.alive ? "alive" : "gone"))]])),
    "No process has recorded itself yet.");
}
function rateText(rate) { return rate ? rate.limit + " per " + rate.per + " s" : "none"; }
async function refreshQueues() {
  const answer = await api("GET", "/queues");
  fill("queues", "queues-note", answer, answer.status !== 200 ? [] : answer.data.queues.map((q) => {
    const row = tableRow([
      ["Queue", q.name], ["Queued", q.queued], ["Running", q.running],
      ["Concurrency", q.concurrency === null ? "none" : q.concurrency], ["Rate", rateText(q.rate)],
      ["State", el("span", q.paused ? "paused" : "active", "badge " + (q.paused ? "paused" : "active"))],
      ["", button(q.paused ? "Resume" : "Pause", () => api("PATCH", "/queues/" + encodeURIComponent(q.name),
        JSON.stringify({paused: !q.paused}), "application/merge-patch+json"))]]);
    row.dataset.queue = q.name;
    return row;
  }), "No queue yet: one appears with its first job.");
}
async function refreshSchedules() {
  const answer = await api("GET", "/schedules");
  fill("schedules", "schedules-note", answer, answer.status !== 200 ? [] : answer.data.schedules.map((c) => {
    const timing = c.cron !== undefined ? "cron " + c.cron : "every " + c.every + " s";
    const last = c.last_job ? button(c.last_job.slice(0, 8) + "\u2026", () => showDetail("job", c.last_job)) : "none yet";
    const body = {job: c.job, paused: !c.paused};
    if (c.cron !== undefined) body.cron = c.cron; else body.every = c.every;
    if (c.timezone) body.timezone = c.timezone;
    const row = tableRow([
      ["Schedule", c.name], ["Timing", timing + (c.timezone ? " (" + c.timezone + ")" : "")],
      ["Next run", c.paused ? "paused" : when(c.next_run_at)], ["Last job", last],
      ["State", el("span", c.paused ? "paused" : "active", "badge " + (c.paused ? "paused" : "active"))],
      ["", button(c.paused ? "Resume" : "Pause", () => api("PUT", "/schedules/" + encodeURIComponent(c.name),
        JSON.stringify(body)))]]);
    row.dataset.schedule = c.name;
    return row;
  }), "No schedule: PUT /schedules/<name> makes one.");
}
let failedShown = [];
async function refreshFailed() {
  const answer = await api("GET", "/jobs?status=failed&limit=10");
  failedShown = answer.status === 200 ? answer.data.jobs.map((job) => job.hash) : [];
  $("retry-all").disabled = !failedShown.length;
  fill("failed", "failed-note", answer, answer.status !== 200 ? [] : answer.data.jobs.map((job) => {
    const open = el("button", job.hash.slice(0, 8) + "\u2026");
    open.type = "button"; open.title = "show job " + job.hash;
    open.addEventListener("click", () => showDetail("job", job.hash));
    const row = tableRow([
      ["Token", open], ["Item", job.item], ["Queue", job.queue], ["Attempts", job.attempts],
      ["Error", el("span", job.error, "error")], ["Finished", when(job.finished_at)],
      ["", button("Retry", () => api("POST", "/check/" + job.hash + "/retry"))]]);
    row.dataset.token = job.hash;
    return row;
  }), "No failed job.");
}

// The detail panel: every field of one job, or a batch with its jobs.
let shown = null;  // {kind: "job" | "batch", id}
function field(list, name, value) {
  const text = value !== null && typeof value === "object" ? JSON.stringify(value, null, 2) : String(value);
  list.append(el("dt", name));
  const dd = el("dd");
  dd.append(typeof value === "object" && value !== null ? el("pre", text) : text);
  list.append(dd);
}
async function showDetail(kind, id) {
  shown = {kind, id};
  const answer = await api("GET", (kind === "job" ? "/check/" : "/batch/") + id);
  if (!shown || shown.id !== id) return;
  const list = $("detail-fields"), jobs = $("detail-jobs");
  list.replaceChildren(); jobs.replaceChildren();
  $("detail").hidden = false;
  if (answer.status !== 200) {
    $("detail-title").textContent = kind === "job" ? "Job" : "Batch";
    field(list, "error", answer.data.message || answer.status);
    return;
  }
  const data = answer.data;
  shown.final = kind === "job" ? ["done", "failed", "canceled"].includes(data.status) : data.finished;
  if (kind === "job") {
    $("detail-title").textContent = "Job " + data.hash;
    for (const [name, value] of Object.entries(data)) field(list, name, value);
    if (data.batch) {
      const open = el("button", "Show its batch");
      open.type = "button";
      open.addEventListener("click", () => showDetail("batch", data.batch));
      jobs.append(el("li")); jobs.lastChild.append(open);
    }
    return;
  }
  $("detail-title").textContent = "Batch " + data.batch;
  for (const name of ["created_at", "total", "finished"]) field(list, name, data[name]);
  field(list, "counts", Object.entries(data.counts).map(([s, n]) => s + " " + n).join(" · "));
  for (const job of data.jobs) {
    const line = el("li"), open = el("button", job.hash.slice(0, 8) + "…");
    open.type = "button"; open.title = "show job " + job.hash;
    open.addEventListener("click", () => showDetail("job", job.hash));
    line.append(open, " ", el("span", job.item), " ", el("span", job.message, "badge " + job.status));
    jobs.append(line);
  }
}

function jobRow(job) {
  const row = el("tr", undefined, "clickable");
  row.dataset.token = job.hash;
  row.title = "show every field of this job";
  row.addEventListener("click", (event) => {
    if (!event.target.closest("button")) showDetail("job", job.hash);
  });
  const cell = (label, content, className) => {
    const td = el("td", undefined, className);
    if (label) td.dataset.label = label;
    if (content instanceof Node) td.append(content); else td.textContent = content;
    row.append(td);
    return td;
  };
  const copy = el("button", job.hash.slice(0, 8) + "\u2026");
  copy.type = "button"; copy.title = "copy " + job.hash;
  copy.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(job.hash); copy.textContent = "copied"; }
    catch (e) { copy.textContent = job.hash; }
  });
  cell("Token", copy);
  cell("Item", job.item, "item");
  cell("Valor", job.valor);
  cell("Status", el("span", job.message, "badge " + job.status)).title = job.status;
  cell("Queue", job.queue);
  cell("Priority", job.priority);
  cell("Attempts", job.attempts);
  // A queued job says when it may start: at once, or later (a delay, a retry's wait).
  const starts = job.status === "queued" ? Date.parse(job.run_at) : NaN;
  cell("Starts", starts > Date.now() ? "at " + when(job.run_at) : (job.status === "queued" ? "now" : ""));
  cell("Finished", when(job.finished_at));
  const progress = cell("Progress", "");
  if (job.status === "running") {
    const bar = el("progress");
    bar.max = 1; bar.value = job.progress;
    progress.append(bar, " " + Math.round(job.progress * 100) + "%");
  }
  const actions = cell("", "");
  if (job.status === "queued" || job.status === "running") {
    const cancel = el("button", "Cancel");
    cancel.type = "button";
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      await api("DELETE", "/check/" + job.hash);
      refresh();
    });
    actions.append(cancel);
    if (job.error) actions.append(" ", el("span", "retry after: " + job.error, "error"));
  } else if (job.status === "failed") {
    actions.append(el("span", job.error, "error"));
  }
  return row;
}

async function refreshJobs() {
  const query = new URLSearchParams({limit: "20"});
  if ($("filter").value) query.set("status", $("filter").value);
  if (before) query.set("before", before);
  const page = await api("GET", "/jobs?" + query);
  const body = $("jobs");
  if (page.status !== 200) {
    body.replaceChildren();
    $("jobs-note").textContent = page.status === 401 ? "The API key is needed to list jobs." : page.data.message;
    return;
  }
  next = page.data.next;
  $("next").disabled = !next;
  $("newest").disabled = !before;
  $("jobs-note").textContent = page.data.jobs.length ? "" : "No jobs here yet.";
  body.replaceChildren(...page.data.jobs.map(jobRow));
}

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    await Promise.all([refreshCounts(), refreshJobs(), refreshFleet(), refreshQueues(),
                       refreshSchedules(), refreshFailed(),
                       shown && !shown.final ? showDetail(shown.kind, shown.id) : null]);
    $("status").textContent = "live, updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("status").textContent = "cannot reach the service";
  } finally {
    busy = false;
  }
}

function addRow() {
  const row = el("div", undefined, "row");
  const item = el("input", undefined, "item");
  item.placeholder = "item"; item.setAttribute("aria-label", "item");
  const valor = el("input", undefined, "valor");
  valor.type = "number"; valor.step = "any"; valor.min = "0"; valor.placeholder = "valor (s)";
  valor.setAttribute("aria-label", "valor in seconds");
  const remove = el("button", "\u2715");
  remove.type = "button"; remove.title = "remove this item";
  remove.addEventListener("click", () => row.remove());
  row.append(item, valor, remove);
  $("rows").append(row);
}

function batchBody() {
  const pasted = $("batch-json").value.trim();
  if (pasted) return pasted;
  const batch = [];
  for (const row of $("rows").querySelectorAll(".row")) {
    const item = row.querySelector(".item").value, valor = row.querySelector(".valor").value;
    if (!item && !valor) continue;
    const entry = {item};
    if (valor !== "") entry.valor = Number(valor);
    for (const name of ["delay", "priority", "queue", "retries"]) {
      const value = $("opt-" + name).value.trim();
      if (value !== "") entry[name] = name === "queue" ? value : Number(value);
    }
    batch.push(entry);
  }
  return JSON.stringify(batch);
}

$("batch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const results = $("results");
  const answer = await api("POST", "/api", batchBody());
  results.replaceChildren();
  if (answer.status !== 202) {
    results.append(el("li", answer.data.message || answer.status, "error"));
    return;
  }
  for (const entry of answer.data.processing_items) {
    const line = el("li");
    line.append(el("code", "#" + entry.index), " ", el("span", entry.item === null ? "(no item)" : entry.item), " ");
    if (entry.error) line.append(el("span", "invalid: " + entry.error, "error"));
    else line.append(el("span", entry.status, "badge queued"), " ", el("code", entry.hash));
    results.append(line);
  }
  const batch = el("li", "batch "), open = el("button", "Show this batch");
  open.type = "button"; open.id = "show-batch";
  open.addEventListener("click", () => showDetail("batch", answer.data.batch));
  batch.append(el("code", answer.data.batch), " ", open);
  results.append(batch);
  refresh();
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value;
  $("key").value = "";
  $("key-form").hidden = true;
  for (const resume of keyAsked.splice(0)) resume();
  refresh();
});
$("retry-all").addEventListener("click", async () => {
  $("retry-all").disabled = true;
  for (const token of failedShown) await api("POST", "/check/" + token + "/retry");
  refresh();
});
$("add-row").addEventListener("click", addRow);
$("detail-close").addEventListener("click", () => { shown = null; $("detail").hidden = true; });
$("filter").addEventListener("change", () => { before = null; refresh(); });
$("next").addEventListener("click", () => { before = next; refresh(); });
$("newest").addEventListener("click", () => { before = null; refresh(); });
addRow(); addRow();
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""


if __name__ == "__main__":
    # Run as a script, this module is __main__: a processor's `import queue_tool`
    # must find it, not load a second copy whose Retry the workers do not know.
    sys.modules["queue_tool"] = sys.modules[__name__]
    sys.exit(main())
