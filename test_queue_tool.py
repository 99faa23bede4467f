"""Tests for queue_tool: webtest against make_app(), and real server processes on 127.0.0.1."""

import collections
import contextlib
import datetime
import http.client
import importlib.util
import inspect
import io
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import wsgiref.util
import wsgiref.validate
import zoneinfo
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import webtest

import queue_tool

HERE = Path(__file__).resolve().parent
# The PostgreSQL server for the tests: each test gets a fresh schema in it.
POSTGRES = os.environ.get("QUEUE_TOOL_TEST_POSTGRES",
                          "postgresql://postgres@127.0.0.1:5432/postgres")
ORIGINAL_BATCH = [{"item": "Teste1"}, {"item": "Teste2", "valor": 10}]
TOKEN = re.compile(r"[0-9a-f]{32}\Z")
UNKNOWN_TOKEN = "0" * 32


# -- Fixtures ------------------------------------------------------------------

@pytest.fixture
def gate():
    """Set it to let gated jobs finish; set at teardown so no worker stays blocked."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture(scope="session")
def postgres():
    """The URL of the tests' PostgreSQL server; skip without one, except under CI."""
    try:
        import psycopg
        with psycopg.connect(POSTGRES, connect_timeout=5):
            return POSTGRES
    except ImportError:
        reason = "psycopg is not installed (pip install -e '.[test,postgres]')"
    except psycopg.Error as exc:
        reason = f"no PostgreSQL server at {POSTGRES}: {str(exc).strip()}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


def in_schema(url, schema):
    """`url` with its search_path set to `schema`, where queue_tool's tables go."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def fresh_schema(server):
    """A new, empty schema on the server, dropped afterwards: a URL that uses it."""
    import psycopg
    schema = "qt_" + secrets.token_hex(6)
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield in_schema(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def db(request, tmp_path):
    """Where a test's store lives: an SQLite file, or (param "postgres") a fresh schema,
    or (param "pgbouncer") a fresh database through a transaction-mode PgBouncer."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        yield tmp_path / "q.sqlite3"
    elif kind == "pgbouncer":
        pool = request.getfixturevalue("pgbouncer_transaction")
        yield pool.url(request.getfixturevalue("fresh_database"))
    else:
        with fresh_schema(request.getfixturevalue("postgres")) as url:
            yield url


@pytest.fixture
def db_postgres(postgres):
    """A fresh PostgreSQL schema, for the tests about PostgreSQL alone."""
    with fresh_schema(postgres) as url:
        yield url


# Runs a test once on each store; without it a test's `db` is an SQLite file.
both_stores = pytest.mark.parametrize("db", ["sqlite", "postgres"], indirect=True)
# The store suite runs on each store, and once more through a transaction-mode pool.
store_suite = pytest.mark.parametrize("db", ["sqlite", "postgres", "pgbouncer"], indirect=True)


def is_postgres(db):
    return str(db).startswith("postgresql://")


def sql(db, query, params=()):
    """Run one statement straight on a test database: its rows. `{jobs}` and
    `{counters}` name either store's tables, and `?` marks a parameter."""
    if is_postgres(db):
        import psycopg
        query = query.format(jobs="queue_tool_jobs", counters="queue_tool_counters",
                             batches="queue_tool_batches")
        with psycopg.connect(str(db), autocommit=True) as connection:
            cursor = connection.execute(query.replace("?", "%s"), params or None)
            return cursor.fetchall() if cursor.description else []
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        return connection.execute(
            query.format(jobs="jobs", counters="counters", batches="batches"), params).fetchall()


@pytest.fixture
def make(db, gate):
    """Build apps on the test's db (or another), closed after the test."""
    apps = []

    def build(**settings):
        settings.setdefault("db", db)
        built = queue_tool.make_app(**settings)
        apps.append(built)
        return built

    yield build
    gate.set()
    for built in apps:
        built.close(grace=1)  # gated jobs end at once; a long default job need not


@pytest.fixture
def seen():
    """Jobs the gated processor has started, in order."""
    return []


@pytest.fixture
def gated(gate, seen):
    """A processor that records its job, then waits for the gate (or a cancel)."""
    def process(job):
        seen.append(job)
        while not gate.wait(0.01):
            if job.canceled.is_set():
                return None
        return {"item": job.item}
    return process


@pytest.fixture
def app(make, gated):
    return make(process=gated, workers=2)


@pytest.fixture
def client(app):
    return webtest.TestApp(wsgiref.validate.validator(app))


def submit(client, batch, status=202, **kwargs):
    return client.post(
        "/api", json.dumps(batch), content_type="application/json", status=status, **kwargs)


def tokens_of(response):
    return [entry["hash"] for entry in response.json["processing_items"]
            if entry["hash"] != "INVALID_JOB_REQUEST"]


def call(app, method, path, body=b"", **environ):
    """Call the WSGI app with a hand-made environ (webtest would fix CONTENT_LENGTH)."""
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO(body)}
    env.update(environ)
    wsgiref.util.setup_testing_defaults(env)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), dict(headers)
    payload = b"".join(app(env, start_response))
    return answer["status"], answer["headers"], json.loads(payload)


def wait_until(predicate, timeout=10.0, what="the condition"):
    """Poll `predicate` until it is true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def assert_queued_gauge_is_true(db):
    """The store's queued gauge must equal a count of the rows. One statement
    reads both: the clock may expire or make a job between two reads."""
    ((rows, gauge),) = sql(db, "SELECT (SELECT COUNT(*) FROM {jobs} WHERE status = 'queued'),"
                           " (SELECT SUM(value) FROM {counters} WHERE name = 'queued')")
    assert gauge == rows


def started_jobs(seen, count):
    wait_until(lambda: len(seen) >= count, what=f"{count} started job(s)")
    return seen[:count]


# -- POST /api: the original contract -----------------------------------------

@both_stores
def test_original_batch_answers_as_the_flask_service_did(client):
    response = submit(client, ORIGINAL_BATCH)
    assert response.json["message"] == "Itens recebidos para processamento"
    invalid, accepted = response.json["processing_items"]
    assert invalid == {"hash": "INVALID_JOB_REQUEST", "index": 0, "item": "Teste1",
                       "error": "'valor' is a required property"}
    assert list(accepted) == ["hash", "index", "item", "status", "check"]
    assert TOKEN.match(accepted["hash"])
    assert accepted["index"] == 1 and accepted["item"] == "Teste2"
    assert accepted["status"] == "queued"
    assert accepted["check"] == f"/check/{accepted['hash']}"


@both_stores
def test_running_job_says_em_processamento(client, seen):
    token = tokens_of(submit(client, [{"item": "a", "valor": 10}]))[0]
    started_jobs(seen, 1)
    response = client.get(f"/check/{token}", status=200)
    assert response.json["message"] == "Em processamento"
    assert response.json["status"] == "running"
    assert response.headers["Retry-After"] == "1"
    assert 0 <= response.json["progress"] <= 1


@both_stores
def test_finished_job_says_finalizado(client, gate):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    gate.set()
    response = client.get(f"/check/{token}?wait=5", status=200)
    assert response.json["message"] == "Finalizado"
    assert response.json["status"] == "done"
    assert "Retry-After" not in response.headers
    assert "progress" not in response.json


@both_stores
def test_queued_job_says_na_fila(make, gated):
    client = webtest.TestApp(make(process=gated, workers=0))
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    response = client.get(f"/check/{token}", status=200)
    assert (response.json["message"], response.json["status"]) == ("Na fila", "queued")
    assert response.json["started_at"] is None and response.json["attempts"] == 0


@both_stores
def test_full_cycle_through_the_wsgi_validator(client, gate):
    response = submit(client, [{"item": "Teste2", "valor": 10}, {"item": "b", "valor": 0}])
    gate.set()
    views = [client.get(f"/check/{token}?wait=5", status=200).json
             for token in tokens_of(response)]
    assert [view["message"] for view in views] == ["Finalizado", "Finalizado"]
    view = views[0]
    assert list(view)[:9] == ["message", "status", "hash", "item", "valor", "created_at",
                              "started_at", "finished_at", "attempts"]
    assert view["item"] == "Teste2" and view["valor"] == 10 and view["attempts"] == 1
    assert view["result"] == {"item": "Teste2"}
    for key in ("created_at", "started_at", "finished_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", view[key])
    assert view["created_at"] <= view["started_at"] <= view["finished_at"]


@both_stores
def test_results_keep_input_order_and_indexes(client):
    batch = [{"item": f"i{n}", "valor": 1} if n % 3 else {"item": f"i{n}"} for n in range(10)]
    items = submit(client, batch).json["processing_items"]
    assert [entry["index"] for entry in items] == list(range(10))
    assert [entry["item"] for entry in items] == [f"i{n}" for n in range(10)]
    assert [entry["hash"] == "INVALID_JOB_REQUEST" for entry in items] == [
        n % 3 == 0 for n in range(10)]


def test_tokens_are_unique_lowercase_hex(client):
    tokens = tokens_of(submit(client, [{"item": "a", "valor": 1}] * 200))
    assert len(set(tokens)) == 200 and all(TOKEN.match(token) for token in tokens)


# -- POST /api: items ----------------------------------------------------------

INVALID_ITEMS = [
    ({"item": "Teste1"}, "Teste1", "'valor' is a required property"),
    ({"valor": 1}, None, "'item' is a required property"),
    ({}, None, "is a required property"),
    ({"item": "", "valor": 1}, "", "should be non-empty"),
    ({"item": "x" * 1001, "valor": 1}, "x" * 1001, "is too long"),
    ({"item": 5, "valor": 1}, None, "5 is not of type 'string'"),
    ({"item": None, "valor": 1}, None, "None is not of type 'string'"),
    ({"item": ["a"], "valor": 1}, None, "is not of type 'string'"),
    ({"item": {"a": 1}, "valor": 1}, None, "is not of type 'string'"),
    ({"item": "a", "valor": "10"}, "a", "'10' is not of type 'number'"),
    ({"item": "a", "valor": True}, "a", "True is not of type 'number'"),
    ({"item": "a", "valor": False}, "a", "False is not of type 'number'"),
    ({"item": "a", "valor": None}, "a", "None is not of type 'number'"),
    ({"item": "a", "valor": [1]}, "a", "is not of type 'number'"),
    ({"item": "a", "valor": -1}, "a", "-1 is less than the minimum of 0"),
    ({"item": "a", "valor": -0.001}, "a", "less than the minimum of 0"),
    ({"item": "a", "valor": 3600.5}, "a", "3600.5 is greater than the maximum of 3600"),
    ([], None, "[] is not of type 'object'"),
    ("Teste", None, "'Teste' is not of type 'object'"),
    (5, None, "5 is not of type 'object'"),
    (None, None, "None is not of type 'object'"),
    (True, None, "True is not of type 'object'"),
]


@pytest.mark.parametrize("item, echoed, message", INVALID_ITEMS)
def test_invalid_item_is_reported_and_not_queued(client, app, item, echoed, message):
    response = submit(client, [item, {"item": "ok", "valor": 1}])
    invalid, accepted = response.json["processing_items"]
    assert invalid["hash"] == "INVALID_JOB_REQUEST" and invalid["index"] == 0
    assert invalid["item"] == echoed
    assert message in invalid["error"]
    assert accepted["status"] == "queued"
    assert [job["token"] for job in app.store.list()[0]] == [accepted["hash"]]


def test_lone_surrogate_item_is_invalid_and_echoed_as_null(client, app):
    body = b'[{"item": "ab\\ud800", "valor": 1}]'
    response = client.post("/api", body, content_type="application/json", status=202)
    (entry,) = response.json["processing_items"]
    assert entry["hash"] == "INVALID_JOB_REQUEST" and entry["item"] is None
    assert "surrogate" in entry["error"]
    assert app.store.list()[0] == []


@pytest.mark.parametrize("item", [
    {"item": "a", "valor": 0},
    {"item": "a", "valor": 3600},
    {"item": "a", "valor": 0.25},
    {"item": "x" * 1000, "valor": 1},
    {"item": "ação ✓ 🚀", "valor": 1},
    {"item": "a", "valor": 1, "other": "ignored", "nested": {"x": [1]}},
])
@both_stores
def test_valid_item_is_queued_as_given(make, item):
    client = webtest.TestApp(make(workers=0))
    (entry,) = submit(client, [item]).json["processing_items"]
    view = client.get(entry["check"], status=200).json
    assert (view["item"], view["valor"]) == (item["item"], item["valor"])
    assert entry["item"] == item["item"]


@both_stores
def test_duplicate_keys_last_one_wins(make):
    client = webtest.TestApp(make(workers=0))
    body = b'[{"item": "a", "valor": -5, "valor": 2}, {"item": "a", "valor": 2, "valor": -5}]'
    valid, invalid = client.post("/api", body, content_type="application/json",
                                 status=202).json["processing_items"]
    assert valid["status"] == "queued"
    assert "less than the minimum" in invalid["error"]


def test_max_valor_setting_moves_the_limit(make):
    client = webtest.TestApp(make(workers=0, max_valor=5))
    ok, too_long = submit(client, [{"item": "a", "valor": 5},
                                   {"item": "b", "valor": 5.5}]).json["processing_items"]
    assert ok["status"] == "queued"
    assert too_long["error"] == "5.5 is greater than the maximum of 5"


@both_stores
def test_all_invalid_batch_is_accepted_with_nothing_queued(client, app):
    items = submit(client, [{"item": "a"}, {"valor": 1}]).json["processing_items"]
    assert {entry["hash"] for entry in items} == {"INVALID_JOB_REQUEST"}
    assert app.store.list()[0] == []


def test_item_validator_is_compiled_once_and_reused(make):
    built = make(workers=0)
    validator = built.validator
    client = webtest.TestApp(built)
    submit(client, [{"item": "a", "valor": 1}, {"item": "b"}])
    assert built.validator is validator
    assert built.schema is queue_tool.ITEM_SCHEMA
    assert isinstance(validator, queue_tool.ItemValidator)  # Draft 2020-12, ECMA patterns
    assert validator.META_SCHEMA == queue_tool.jsonschema.Draft202012Validator.META_SCHEMA


# -- POST /api: whole-request errors ------------------------------------------

def nested(depth):
    """A body whose top-level array holds arrays down to `depth` levels."""
    return ("[" * depth + "]" * depth).encode()


REQUEST_ERRORS = [
    # (body, content type, status, error)
    (b"", "application/json", 400, "invalid_json"),
    (b"not json", "application/json", 400, "invalid_json"),
    (b'[{"item": "a", "valor": 1}', "application/json", 400, "invalid_json"),
    (b'[{"item": "\xff", "valor": 1}]', "application/json", 400, "invalid_json"),
    ('[{"item": "a", "valor": 1}]'.encode("utf-16"), "application/json", 400, "invalid_json"),
    (b'\xef\xbb\xbf[{"item": "a", "valor": 1}]', "application/json", 400, "invalid_json"),
    (b'[{"item": "a", "valor": NaN}]', "application/json", 400, "invalid_json"),
    (b'[{"item": "a", "valor": Infinity}]', "application/json", 400, "invalid_json"),
    (b'[{"item": "a", "valor": -Infinity}]', "application/json", 400, "invalid_json"),
    (b'[{"item": "a", "valor": 1e309}]', "application/json", 400, "invalid_json"),
    (b'[{"item": "a", "valor": 1' + b"0" * 400 + b"}]", "application/json", 400,
     "invalid_json"),
    (nested(33), "application/json", 400, "invalid_json"),
    (nested(100_000), "application/json", 400, "invalid_json"),
    (b'{"item": "a", "valor": 1}', "application/json", 400, "not_a_list"),
    (b'"text"', "application/json", 400, "not_a_list"),
    (b"null", "application/json", 400, "not_a_list"),
    (b"5", "application/json", 400, "not_a_list"),
    (b"[]", "application/json", 400, "empty_batch"),
    (b" [ ] ", "application/json", 400, "empty_batch"),
    (b'[{"item": "a", "valor": 1}]', "text/plain", 415, "unsupported_media_type"),
    (b'[{"item": "a", "valor": 1}]', "application/x-www-form-urlencoded", 415,
     "unsupported_media_type"),
    (b"not json", "text/html; charset=utf-8", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("body, content_type, status, error", REQUEST_ERRORS)
def test_bad_request_is_refused_whole(client, app, body, content_type, status, error):
    response = client.post("/api", body, content_type=content_type, status=status)
    assert response.json["error"] == error
    assert response.json["message"]
    assert response.content_type == "application/json"
    assert app.store.list()[0] == [] and app.store.counters()["submitted"] == 0


def test_nesting_of_32_levels_is_still_json(client):
    item = submit_raw = client.post("/api", nested(32), content_type="application/json",
                                    status=202)
    (entry,) = item.json["processing_items"]
    assert entry["hash"] == "INVALID_JOB_REQUEST" and submit_raw.status_int == 202


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON",
    "application/vnd.api+json"])
def test_json_media_types_are_accepted(client, content_type):
    client.post("/api", b'[{"item": "a", "valor": 1}]', content_type=content_type, status=202)


def test_missing_content_type_is_taken_as_json(client):
    response = client.request("/api", method="POST", body=b'[{"item": "a", "valor": 1}]',
                              status=202)
    assert response.json["processing_items"][0]["status"] == "queued"


@pytest.mark.parametrize("length", ["abc", "-1", "1.5", "+3", "0x10", "١"])
def test_bad_content_length_is_refused(app, length):
    status, _, body = call(app, "POST", "/api", b"[]", CONTENT_TYPE="application/json",
                           CONTENT_LENGTH=length)
    assert (status, body["error"]) == (400, "invalid_content_length")


def test_body_shorter_than_content_length_is_refused(app):
    status, _, body = call(app, "POST", "/api", b'[{"item": "a", "valor": 1}]',
                           CONTENT_TYPE="application/json", CONTENT_LENGTH="500")
    assert (status, body["error"]) == (400, "invalid_content_length")
    assert app.store.list()[0] == []


@pytest.mark.parametrize("content_type, length, body, status, error", [
    # media type is checked before framing, framing before the JSON itself
    ("text/plain", "abc", b"junk", 415, "unsupported_media_type"),
    ("application/json", "abc", b"junk", 400, "invalid_content_length"),
    ("application/json", None, b"{junk", 400, "invalid_json"),
    ("application/json", None, b"{}", 400, "not_a_list"),
])
def test_checks_run_in_spec_order(app, content_type, length, body, status, error):
    length = str(len(body)) if length is None else length
    answer = call(app, "POST", "/api", body, CONTENT_TYPE=content_type, CONTENT_LENGTH=length)
    assert (answer[0], answer[2]["error"]) == (status, error)


# -- GET /check/<token> ----------------------------------------------------------

@pytest.mark.parametrize("path", [
    f"/check/{UNKNOWN_TOKEN}", "/check/", "/check/abc", "/check/" + "A" * 32,
    "/check/" + "g" * 32, "/check/" + "0" * 33, f"/check/{UNKNOWN_TOKEN}/x",
    "/check/..%2Fapi"])
def test_unknown_or_malformed_token_is_404(client, path):
    response = client.get(path, status=404)
    assert response.json == {"message": "no job has this token", "error": "not_found"}


@pytest.mark.parametrize("wait", ["", "0", "0.0", "-1", "30.5", "31", "abc", "nan", "inf",
                                  "1e1", "1_0", " 1"])
def test_bad_wait_is_400(client, wait):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    response = client.get(f"/check/{token}", {"wait": wait}, status=400)
    assert response.json["error"] == "invalid_wait"


@both_stores
def test_wait_holds_until_the_job_finishes(client, gate, seen):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    started_jobs(seen, 1)
    releaser = threading.Timer(0.2, gate.set)
    releaser.start()
    began = time.monotonic()
    response = client.get(f"/check/{token}?wait=10", status=200)
    assert response.json["message"] == "Finalizado"
    assert time.monotonic() - began >= 0.15
    releaser.join()


@both_stores
def test_wait_returns_the_current_state_when_time_runs_out(client, seen):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    started_jobs(seen, 1)
    began = time.monotonic()
    response = client.get(f"/check/{token}?wait=0.3", status=200)
    assert response.json["message"] == "Em processamento"
    assert time.monotonic() - began >= 0.3


@both_stores
def test_wait_on_a_finished_job_answers_at_once(client, gate):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    gate.set()
    client.get(f"/check/{token}?wait=10", status=200)
    began = time.monotonic()
    assert client.get(f"/check/{token}?wait=30", status=200).json["status"] == "done"
    assert time.monotonic() - began < 5


@both_stores
def test_wait_on_a_job_of_another_process_polls_the_store(make, gate, gated, tmp_path):
    runner = make(process=gated, workers=1)
    watcher = webtest.TestApp(make(workers=0))  # another app on the db: no Event for it
    token = tokens_of(submit(webtest.TestApp(runner), [{"item": "a", "valor": 1}]))[0]
    threading.Timer(0.2, gate.set).start()
    assert watcher.get(f"/check/{token}?wait=10", status=200).json["status"] == "done"


@both_stores
def test_job_view_omits_progress_unless_running(make):
    client = webtest.TestApp(make(workers=0))
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    view = client.get(f"/check/{token}", status=200).json
    assert "progress" not in view and "result" not in view and "error" not in view


def test_responses_are_not_cached(client):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    assert client.get(f"/check/{token}", status=200).headers["Cache-Control"] == "no-store"


# -- DELETE /check/<token> ---------------------------------------------------------

@both_stores
def test_cancel_queued_job_never_runs(make, gated, seen, db):
    built = make(process=gated, workers=0)
    client = webtest.TestApp(built)
    first, second = tokens_of(submit(client, [{"item": "a", "valor": 1}] * 2))
    view = client.delete(f"/check/{first}", status=200).json
    assert (view["status"], view["message"]) == ("canceled", "Cancelado")
    assert view["finished_at"] is not None and "Retry-After" not in client.get(
        f"/check/{first}").headers
    runner = make(process=gated, workers=1)
    runner.start()
    started_jobs(seen, 1)
    assert [job.token for job in seen] == [second]
    assert client.get(f"/check/{first}", status=200).json["attempts"] == 0
    assert_queued_gauge_is_true(db)


@both_stores
def test_cancel_running_job_sets_its_cancel_event(client, seen):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    (job,) = started_jobs(seen, 1)
    view = client.delete(f"/check/{token}", status=200).json
    assert view["status"] == "canceled" and view["attempts"] == 1
    assert job.canceled.wait(5)
    assert client.get(f"/check/{token}?wait=1", status=200).json["status"] == "canceled"


@both_stores
def test_cancel_stops_the_default_processor_at_once(make):
    built = make(workers=1)
    client = webtest.TestApp(built)
    long, short = tokens_of(submit(client, [{"item": "long", "valor": 3600},
                                            {"item": "short", "valor": 0}]))
    wait_until(lambda: client.get(f"/check/{long}").json["status"] == "running")
    client.delete(f"/check/{long}", status=200)
    # the only worker is free again: the next job runs
    assert client.get(f"/check/{short}?wait=10", status=200).json["status"] == "done"
    assert client.get(f"/check/{long}", status=200).json["status"] == "canceled"


@both_stores
def test_cancel_wakes_waiters_even_if_the_processor_runs_on(make, gate, seen):
    def stubborn(job):
        seen.append(job)
        gate.wait(30)  # ignores job.canceled
    built = make(process=stubborn, workers=1)
    client = webtest.TestApp(built)
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    started_jobs(seen, 1)
    answers = []
    waiter = threading.Thread(
        target=lambda: answers.append(client.get(f"/check/{token}?wait=25").json))
    waiter.start()
    wait_until(lambda: token in built.runner._live)
    client.delete(f"/check/{token}", status=200)
    waiter.join(10)
    assert not gate.is_set() and answers[0]["status"] == "canceled"
    assert token not in built.runner._live


@pytest.mark.parametrize("process, final", [
    (lambda job: None, "done"), (lambda job: 1 / 0, "failed")])
@both_stores
def test_cancel_finished_job_is_409(make, process, final):
    client = webtest.TestApp(make(process=process, workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
    assert client.get(f"/check/{token}?wait=5", status=200).json["status"] == final
    response = client.delete(f"/check/{token}", status=409)
    assert response.json["error"] == "already_finished"
    assert client.get(f"/check/{token}", status=200).json["status"] == final


@both_stores
def test_cancel_twice_is_409(client):
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    client.delete(f"/check/{token}", status=200)
    assert client.delete(f"/check/{token}", status=409).json["error"] == "already_finished"


@pytest.mark.parametrize("path", [f"/check/{UNKNOWN_TOKEN}", "/check/nope"])
def test_cancel_unknown_job_is_404(client, path):
    assert client.delete(path, status=404).json["error"] == "not_found"


@both_stores
def test_cancel_racing_the_finish_ends_in_one_consistent_state(make, db):
    go = threading.Barrier(2)

    def racer(job):
        go.wait(5)  # the processor returns exactly as the DELETE goes out
        return "finished"
    built = make(process=racer, workers=1)
    client = webtest.TestApp(built)
    outcomes = []
    for _ in range(30):
        token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
        go.wait(5)
        response = client.delete(f"/check/{token}", expect_errors=True)
        final = client.get(f"/check/{token}?wait=5", status=200).json
        outcomes.append((response.status_int, final["status"]))
        assert (response.status_int, final["status"]) in {(200, "canceled"), (409, "done")}
        assert ("result" in final) == (final["status"] == "done")
    counters = built.store.counters()
    assert counters["finished_done"] + counters["finished_canceled"] == 30
    assert_queued_gauge_is_true(db)
    assert counters["finished_canceled"] == sum(code == 200 for code, _ in outcomes)


# -- GET /jobs -------------------------------------------------------------------------

@both_stores
def test_jobs_lists_newest_first_with_a_cursor(make):
    client = webtest.TestApp(make(workers=0))
    tokens = tokens_of(submit(client, [{"item": f"j{n}", "valor": 1} for n in range(5)]))
    page = client.get("/jobs?limit=3", status=200).json
    assert [job["hash"] for job in page["jobs"]] == tokens[::-1][:3]
    assert page["jobs"][0]["message"] == "Na fila"
    rest = client.get("/jobs", {"limit": 3, "before": page["next"]}, status=200).json
    assert [job["hash"] for job in rest["jobs"]] == tokens[::-1][3:]
    assert rest["next"] is None


def test_jobs_default_page_is_50(make):
    client = webtest.TestApp(make(workers=0))
    submit(client, [{"item": "a", "valor": 1}] * 60)
    page = client.get("/jobs", status=200).json
    assert len(page["jobs"]) == 50 and page["next"]


@both_stores
def test_jobs_filters_by_status(make):
    built = make(workers=0)
    client = webtest.TestApp(built)
    tokens = tokens_of(submit(client, [{"item": f"j{n}", "valor": 1} for n in range(4)]))
    client.delete(f"/check/{tokens[1]}", status=200)
    canceled = client.get("/jobs?status=canceled", status=200).json
    assert [job["hash"] for job in canceled["jobs"]] == [tokens[1]]
    queued = client.get("/jobs?status=queued&limit=2", status=200).json
    assert [job["hash"] for job in queued["jobs"]] == [tokens[3], tokens[2]]
    older = client.get("/jobs", {"status": "queued", "before": queued["next"]}).json
    assert [job["hash"] for job in older["jobs"]] == [tokens[0]]
    assert client.get("/jobs?status=done", status=200).json == {"jobs": [], "next": None}


@both_stores
def test_paging_with_inserts_in_between_sees_every_job_once(make):
    client = webtest.TestApp(make(workers=0))
    original = set()
    for start in range(0, 250, 50):
        original |= set(tokens_of(submit(client, [{"item": f"j{n}", "valor": 1}
                                                  for n in range(start, start + 50)])))
    seen_tokens, cursor, pages = [], None, 0
    while True:
        params = {"limit": 37} if cursor is None else {"limit": 37, "before": cursor}
        page = client.get("/jobs", params, status=200).json
        seen_tokens += [job["hash"] for job in page["jobs"]]
        submit(client, [{"item": "late", "valor": 1}] * 3)  # newer than every cursor
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen_tokens) == len(set(seen_tokens)) == 250
    assert set(seen_tokens) == original and pages == 7


@pytest.mark.parametrize("query, error", [
    ("limit=0", "invalid_limit"), ("limit=501", "invalid_limit"), ("limit=", "invalid_limit"),
    ("limit=abc", "invalid_limit"), ("limit=-1", "invalid_limit"), ("limit=1.5", "invalid_limit"),
    ("status=", "invalid_status"), ("status=Queued", "invalid_status"),
    ("status=lost", "invalid_status"), ("before=", "invalid_cursor"),
    ("before=abc", "invalid_cursor"), ("before=12", "invalid_cursor"),
    ("before=YmVmb3JlOjA", "invalid_cursor"),          # "before:0"
    ("before=YmVmb3JlOi0x", "invalid_cursor"),         # "before:-1"
    ("before=YmVmb3JlOjE=", "invalid_cursor"),         # padded: not one handed out
    ("before=%FF", "invalid_cursor"),
    ("queue=", "invalid_queue"), ("queue=Big", "invalid_queue"), ("queue=a%0A", "invalid_queue"),
    ("queue=-a", "invalid_queue"), ("queue=" + "a" * 65, "invalid_queue"),
])
def test_jobs_bad_parameters_are_400(client, query, error):
    assert client.get(f"/jobs?{query}", status=400).json["error"] == error


def test_jobs_limit_500_is_allowed(client):
    assert client.get("/jobs?limit=500", status=200).json == {"jobs": [], "next": None}


def test_listing_and_claiming_use_indexes(app, tmp_path):
    store = queue_tool.SQLiteStore
    connection = sqlite3.connect(tmp_path / "q.sqlite3")
    claim = {"owner": "o", "now": 5, "lease": 1, "queues": None, "limit": 8}
    listing = {"status": "done", "before": 5, "queue": None, "limit": 9}
    lost = {"now": 5, "lost": '["gone"]', "most": 3}
    plans = {  # the store's own statements, as it runs them
        "claim": (store.CLAIM, claim),
        "claim in queues": (store.CLAIM, {**claim, "queues": '["a", "b"]'}),
        "ready": (store.ANY_READY, {"now": 5, "queues": None}),
        "next due": (store.NEXT_DUE, {"queues": '["a"]'}),
        "list": (store.LIST_BY_STATUS, listing),
        "list all": (store.LIST, {**listing, "queue": "a"}),
        "purge": (store.PURGE_JOBS, (5, 500)),
        "check": (store.GET_JOB, ("x",)),
        "expired": (store.ANY_LOST, lost),
        "recover": (store.RECOVER, lost),
        "batch": (store.GET_BATCH, ("x",)),
        "batch jobs": (store.UNFINISHED_OF_BATCH, ("x",)),
        "listener": (store.READY_COUNT, (5, 16)),
    }
    for name, (query, params) in plans.items():
        steps = [row[-1] for row in connection.execute("EXPLAIN QUERY PLAN " + query, params)]
        # Every step on jobs goes through an index (a partial index may be walked in
        # order: that is the claim); nothing is sorted in a temporary tree.
        assert all("USING" in step for step in steps if " jobs" in step), (name, steps)
        assert not any("TEMP B-TREE" in step for step in steps), (name, steps)
    connection.close()


# -- Leases, recovery, retention -----------------------------------------------------------

@both_stores
def test_running_job_renews_its_lease(make, gated, seen):
    built = make(process=gated, workers=1, lease=0.3)
    token = tokens_of(submit(webtest.TestApp(built), [{"item": "a", "valor": 1}]))[0]
    started_jobs(seen, 1)
    first = built.store.get(token)["lease_until"]
    wait_until(lambda: built.store.get(token)["lease_until"] > first + 0.2,
               what="the lease to be renewed")
    assert built.store.get(token)["attempts"] == 1  # never taken back while renewed


@both_stores
def test_expired_lease_is_requeued_and_run_again(make, gated, seen, db):
    """A stalled owner (no renewals) loses the job to a live process."""
    stalled = make(process=gated, workers=1, lease=0.5)
    stalled.runner._housekeep = lambda stopping: None  # it never renews: it looks hung
    token = tokens_of(submit(webtest.TestApp(stalled), [{"item": "a", "valor": 1}]))[0]
    started_jobs(seen, 1)
    rescuer = make(process=lambda job: job.attempts, workers=1, lease=0.5)
    rescuer.start()
    view = webtest.TestApp(rescuer).get(f"/check/{token}?wait=10", status=200).json
    assert (view["status"], view["attempts"], view["result"]) == ("done", 2, 2)
    assert_queued_gauge_is_true(db)


@both_stores
def test_job_whose_worker_thread_died_is_not_held_forever(make, caplog):
    def exits(job):
        raise SystemExit("a processor that ends its thread")  # not an Exception
    built = make(process=exits, workers=1, lease=0.3, max_attempts=1)
    client = webtest.TestApp(built)
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    view = client.get(f"/check/{token}?wait=10", status=200).json
    assert (view["status"], view["error"]) == ("failed", "worker lost after 1 attempts")
    assert client.get("/health", status=200).json["workers"] == 0
    assert "queue_tool-worker-0 ended: SystemExit" in caplog.text


@both_stores
def test_job_lost_max_attempts_times_fails(make, db):
    store = queue_tool.open_store(db)
    store.submit([("a" * 32, "a", 1)], 0, 10)
    for attempt in range(1, 4):
        row = claim(store, "elsewhere:1:x", -1)  # a lease already run out
        assert row["attempts"] == attempt
        recovered = store.recover(max_attempts=3)
        assert recovered == [("a" * 32, "queued" if attempt < 3 else "failed")]
    view = webtest.TestApp(make(workers=0)).get("/check/" + "a" * 32, status=200).json
    assert (view["status"], view["message"]) == ("failed", "Falhou")
    assert view["error"] == "worker lost after 3 attempts" and view["attempts"] == 3
    assert store.counters()["finished_failed"] == 1
    assert_queued_gauge_is_true(db)
    store.close()


@both_stores
def test_jobs_of_a_dead_process_on_this_host_are_recovered_at_once(make, db):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    store = queue_tool.open_store(db)
    store.submit([("b" * 32, "b", 0)], 0, 10)
    owner = f"{queue_tool.socket.gethostname()}:{dead}:feed"
    claim(store, owner, 3600)  # a lease far from running out
    store.close()
    client = webtest.TestApp(make(workers=1))
    view = client.get("/check/" + "b" * 32 + "?wait=10", status=200).json
    assert (view["status"], view["attempts"]) == ("done", 2)


@both_stores
def test_live_owner_keeps_its_job_until_the_lease_runs_out(make, db):
    store = queue_tool.open_store(db)
    store.submit([("c" * 32, "c", 0)], 0, 10)
    owner = f"{queue_tool.socket.gethostname()}:{os.getpid()}:other"  # alive: this process
    claim(store, owner, 3600)
    store.close()
    built = make(workers=1)
    built.start()
    built.runner._recover()
    assert built.store.get("c" * 32)["status"] == "running"


def test_queued_gauge_is_recounted_when_the_store_opens(make, tmp_path):
    client = webtest.TestApp(make(workers=0))
    submit(client, [{"item": "a", "valor": 1}] * 3)
    sql(tmp_path / "q.sqlite3", "UPDATE counters SET value = 999 WHERE name = 'queued'")
    reopened = webtest.TestApp(make(workers=0))
    assert reopened.get("/health", status=200).json["queued"] == 3
    assert_queued_gauge_is_true(tmp_path / "q.sqlite3")


@both_stores
def test_finished_jobs_are_purged_after_retention(make):
    built = make(workers=1, retention=0.2)
    client = webtest.TestApp(built)
    done, waiting = tokens_of(submit(client, [{"item": "a", "valor": 0},
                                              {"item": "b", "valor": 3600}]))
    client.get(f"/check/{done}?wait=5", status=200)
    wait_until(lambda: client.get(f"/check/{done}", expect_errors=True).status_int == 404,
               what="the finished job to be purged")
    assert client.get(f"/check/{waiting}", status=200).json["status"] == "running"
    assert built.store.counters()["finished_done"] == 1  # totals survive purges


@both_stores
def test_purge_works_in_small_batches(db):
    store = queue_tool.open_store(db)
    jobs = [(f"{n:032x}", "a", 0) for n in range(1200)]
    store.submit(jobs, 0, 10_000)
    owner = "here:1:x"
    for _ in jobs:
        row = claim(store, owner, 60)
        finish(store, row["token"], owner, "done")
    assert store.purge(-50) == 500  # finished before "50 s from now": all of them
    runner = queue_tool.Runner(store, workers=0, retention=-50)
    assert runner.purge() == 700
    assert store.list()[0] == []
    store.close()


@both_stores
def test_a_run_that_lost_its_job_cannot_end_the_run_that_took_it_back(make):
    """The process lost its lease (an outage longer than the lease, say), and took the
    job back in another thread while the first run went on: only the new run ends it."""
    gates, runs = collections.defaultdict(threading.Event), []

    def process(job):
        runs.append((job, threading.current_thread().name))
        gates[job.attempts].wait(30)
        return f"run {job.attempts}"
    built = make(process=process, workers=2)
    ran, original = [], built.runner._execute

    def execute(job):
        try:
            return original(job)
        finally:
            ran.append(job.attempts)
    built.runner._execute = execute
    client = webtest.TestApp(built)
    (token,) = tokens_of(submit(client, [{"item": "a", "valor": 1}]))
    wait_until(lambda: len(runs) == 1, what="the first run")
    # What any process does with a job whose lease ran out: back to the queue.
    assert built.store.recover(5, [built.runner.owner]) == [(token, "queued")]
    built.runner.notify_submitted(1)
    wait_until(lambda: len(runs) == 2, what="the second run")
    assert [job.attempts for job, _ in runs] == [1, 2]
    (first, _), _ = runs
    assert first.canceled.is_set()  # told that it holds the job no more
    gates[1].set()
    wait_until(lambda: 1 in ran, what="the first run to end")
    row = built.store.get(token)
    assert (row["status"], row["attempts"], row["result"]) == ("running", 2, None)
    gates[2].set()
    view = client.get(f"/check/{token}?wait=10", status=200).json
    assert (view["status"], view["attempts"], view["result"]) == ("done", 2, "run 2")


@both_stores
def test_jobs_claimed_ahead_go_back_to_the_queue_when_no_worker_takes_them_soon(make, db, gate):
    """Short jobs are claimed ahead; once a long one holds the worker, those wait no
    longer than hold_ahead before other processes may take them, their attempt
    not counted."""
    def process(job):
        if job.item == "long":
            gate.wait(30)
    built = make(process=process, workers=1)
    given_back, original = [], built.store.unclaim

    def unclaim(owner, runs):
        given_back.append(dict(runs))
        return original(owner, runs)
    built.store.unclaim = unclaim
    client = webtest.TestApp(built)
    for token in tokens_of(submit(client, [{"item": f"quick {n}", "valor": 0}
                                           for n in range(200)])):
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    long, *after = tokens_of(submit(client, [{"item": "long", "valor": 0}] + [
        {"item": f"after {n}", "valor": 0} for n in range(20)]))
    wait_until(lambda: given_back, what="jobs claimed ahead to go back")
    assert set(given_back[0]) <= set(after) and set(given_back[0].values()) == {1}
    wait_until(lambda: not built.runner._ready, what="nothing held ahead")
    rows = {job["token"]: job for job in built.store.list(limit=100)[0]}
    assert rows[long]["status"] == "running"
    assert {(rows[t]["status"], rows[t]["attempts"]) for t in after} == {("queued", 0)}
    assert_queued_gauge_is_true(db)
    gate.set()
    for token in after:
        view = client.get(f"/check/{token}?wait=10").json
        assert (view["status"], view["attempts"]) == ("done", 1)


@both_stores
def test_a_job_claimed_ahead_and_canceled_never_runs(make, gate):
    ran = []

    def process(job):
        ran.append(job.item)
        if job.item == "long":
            gate.wait(30)
    built = make(process=process, workers=1)
    built.runner.hold_ahead = 60  # they stay claimed ahead while the long one runs
    client = webtest.TestApp(built)
    for token in tokens_of(submit(client, [{"item": f"quick {n}", "valor": 0}
                                           for n in range(200)])):
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    _, canceled, *after = tokens_of(submit(client, [{"item": "long", "valor": 0}] + [
        {"item": f"after {n}", "valor": 0} for n in range(5)]))
    wait_until(lambda: len(built.runner._ready) == 5, what="five jobs claimed ahead")
    assert client.delete(f"/check/{canceled}", status=200).json["status"] == "canceled"
    assert canceled not in {row["token"] for row, _ in built.runner._ready}
    gate.set()
    for token in after:
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    assert client.get(f"/check/{canceled}").json["status"] == "canceled"
    assert "after 0" not in ran and len(ran) == 205


@both_stores
def test_a_failure_in_the_committer_wakes_its_workers_and_they_carry_on(make, caplog):
    built = make(workers=2, lease=1)
    runner, failed = built.runner, []
    original = runner._hand_out

    def hand_out(claims, asked, rows):
        if rows and not failed:  # once, after the store claimed a job for nobody
            failed.append(len(rows))
            raise RuntimeError("the bookkeeping broke")
        return original(claims, asked, rows)
    runner._hand_out = hand_out
    client = webtest.TestApp(built)
    (token,) = tokens_of(submit(client, [{"item": "lost", "valor": 0}]))
    # The job claimed in the failed round comes back when its lease runs out.
    view = client.get(f"/check/{token}?wait=20", status=200).json
    assert failed == [1] and (view["status"], view["attempts"]) == ("done", 2)
    later = tokens_of(submit(client, [{"item": f"then {n}", "valor": 0} for n in range(20)]))
    for later_token in later:
        assert client.get(f"/check/{later_token}?wait=10").json["status"] == "done"
    assert "recording ends and claims failed" in caplog.text
    assert "the bookkeeping broke" in caplog.text
    assert runner._committer.is_alive() and runner.alive_workers() == 2


@both_stores
def test_stop_puts_jobs_back_only_after_the_claim_under_way(make):
    built = make(workers=1)
    store, order = built.store, []
    in_flight, hold = threading.Event(), threading.Event()
    original_claim, original_release = store.finish_and_claim, store.release

    def slow_claim(owner, finishes, claims, lease, queues=None, limits=None):
        held = claims and not in_flight.is_set()  # the first claim: the job is queued
        if held:
            in_flight.set()
            hold.wait(30)
        result = original_claim(owner, finishes, claims, lease, queues, limits)
        if held:
            order.append("claimed")
        return result

    def release(owner):
        order.append("released")
        return original_release(owner)
    token = hexes("s")[0]
    store.submit([queue_tool.NewJob(token, "a", 1)], 0, 10)  # before the workers start
    store.finish_and_claim, store.release = slow_claim, release
    built.start()
    assert in_flight.wait(10)
    stopper = threading.Thread(target=built.runner.stop, kwargs={"grace": 0})
    stopper.start()
    stopper.join(0.5)  # time enough to release too early, which it must not
    assert order == []
    hold.set()
    stopper.join(30)
    assert order == ["claimed", "released"]
    row = store.get(token)  # its owner stays: the process that last ran it
    assert (row["status"], row["owner"], row["attempts"]) == ("queued", built.runner.owner, 1)


# -- Shutdown --------------------------------------------------------------------------------

@both_stores
def test_close_gives_grace_then_requeues_without_failing(make, gated, seen, gate, db):
    built = make(process=gated, workers=2, max_attempts=1)
    tokens = tokens_of(submit(webtest.TestApp(built), [{"item": "a", "valor": 1}] * 3))
    jobs = started_jobs(seen, 2)
    requeued = built.close(grace=0.2)
    assert sorted(requeued) == sorted(job.token for job in jobs)
    assert all(job.canceled.is_set() for job in jobs)
    reader = make(workers=0)
    for token in tokens:
        row = reader.store.get(token)
        assert row["status"] == "queued" and row["lease_until"] is None
    assert_queued_gauge_is_true(db)


@both_stores
def test_close_lets_jobs_that_end_within_grace_finish(make):
    built = make(workers=1)
    token = tokens_of(submit(webtest.TestApp(built), [{"item": "a", "valor": 0.3}]))[0]
    wait_until(lambda: built.store.get(token)["status"] == "running")
    assert built.close(grace=10) == []
    assert make(workers=0).store.get(token)["status"] == "done"


@both_stores
def test_sigterm_exits_0_within_grace_and_restart_finishes_the_rest(servers, db):
    db = str(db)
    server = servers("--db", db, "--workers", "2", "--grace", "1", "--max-attempts", "1")
    status, body = server.request("POST", "/api", [{"item": f"j{n}", "valor": 5}
                                                    for n in range(4)])
    tokens = [entry["hash"] for entry in body["processing_items"]]
    wait_until(lambda: sum(server.request("GET", f"/check/{t}")[1]["status"] == "running"
                           for t in tokens) == 2)
    began = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began < 1 + 5
    assert "stopped; 2 unfinished jobs put back in the queue" in server.log.read_text()
    restarted = servers("--db", db, "--workers", "4", "--max-valor", "5", name="restart")
    for token in tokens:
        status, view = restarted.request("GET", f"/check/{token}?wait=20")
        assert (status, view["status"]) == (200, "done")
    assert restarted.stop(signal.SIGINT) == 0


@both_stores
def test_crash_loses_no_job_and_restart_finishes_all(servers, db):
    server = servers("--db", str(db), "--workers", "2")
    tokens = submit_in_batches(server, 40, 10, valor=0.5, prefix="j")
    reader = queue_tool.open_store(db)
    def states():
        return collections.Counter(reader.get(t)["status"] for t in tokens)
    wait_until(lambda: states()["done"] >= 4 and states()["running"] == 2,
               what="a few jobs done and two running")
    server.stop(signal.SIGKILL)
    running_at_crash = {t for t in tokens if reader.get(t)["status"] == "running"}
    done_at_crash = {t for t in tokens if reader.get(t)["status"] == "done"}
    assert 1 <= len(running_at_crash) <= 2 and len(done_at_crash) >= 4
    restarted = servers("--db", str(db), "--workers", "4", name="restart")
    for token in tokens:
        status, view = restarted.request("GET", f"/check/{token}?wait=30")
        assert (status, view["message"]) == (200, "Finalizado"), token
        # a job runs again only if it was running when the process died
        assert view["attempts"] == (2 if token in running_at_crash else 1)
    counters = reader.counters()
    assert counters["submitted"] == counters["finished_done"] == 40
    assert_queued_gauge_is_true(db)
    assert restarted.stop() == 0
    reader.close()


# -- Several processes ------------------------------------------------------------------------

@both_stores
def test_job_submitted_elsewhere_starts_within_50ms(servers, db):
    """A front process (--workers 0) and a worker process: the wake-up crosses processes
    through the store (LISTEN/NOTIFY, or SQLite's data_version), not the 1 s poll."""
    front = servers("--db", str(db), "--workers", "0", name="front")
    worker = servers("worker", "--db", str(db), "--workers", "1", name="worker",
                     ready=WORKING)
    assert_jobs_start_within_50ms(front)
    assert worker.stop() == 0 and front.stop() == 0
    assert "working (db" in worker.log.read_text()


def iso_seconds(text):
    return datetime.datetime.fromisoformat(text).timestamp()


def submit_in_batches(server, total, size, valor=0, prefix=""):
    """Submit `total` items to a server process, `size` a batch: their tokens."""
    tokens = []
    for start in range(0, total, size):
        status, body = server.request("POST", "/api", [
            {"item": f"{prefix}{n}", "valor": valor} for n in range(start, start + size)])
        assert status == 202
        tokens += [entry["hash"] for entry in body["processing_items"]]
    return tokens


def assert_jobs_start_within_50ms(front):
    """Five single submits to `front`, each started by an idle worker within 50 ms
    (on the store's clock): woken through the store, not by the 1 s poll. One job
    done first: the worker process, just started, may still be opening its
    listener's and its pool's connections (seen once at 68 ms)."""
    status, body = front.request("POST", "/api", [{"item": "warm-up", "valor": 0}])
    assert front.request("GET", f"/check/{body['processing_items'][0]['hash']}?wait=10"
                         )[1]["status"] == "done"
    for attempt in range(5):
        status, body = front.request("POST", "/api", [{"item": f"a{attempt}", "valor": 0}])
        assert status == 202
        token = body["processing_items"][0]["hash"]
        status, view = front.request("GET", f"/check/{token}?wait=10")
        assert view["status"] == "done"
        waited = iso_seconds(view["started_at"]) - iso_seconds(view["created_at"])
        assert waited < 0.05, f"job {attempt} started {waited * 1000:.1f} ms after its submit"


@both_stores
def test_cancel_in_one_process_stops_the_job_in_another(servers, make, db):
    worker = servers("--db", str(db), "--workers", "1", "--lease", "3600")
    client = webtest.TestApp(make(workers=0))
    long, short = tokens_of(submit(client, [{"item": "long", "valor": 3600},
                                            {"item": "short", "valor": 0}]))
    wait_until(lambda: client.get(f"/check/{long}").json["status"] == "running")
    assert client.delete(f"/check/{long}", status=200).json["status"] == "canceled"
    # told through the store at once, not at a lease renewal (an hour away here)
    assert client.get(f"/check/{short}?wait=5", status=200).json["status"] == "done"
    status, view = worker.request("GET", f"/check/{long}")
    assert (status, view["status"]) == (200, "canceled")
    assert worker.stop() == 0


@both_stores
def test_stalled_process_loses_its_job_and_it_runs_elsewhere(servers, make, db):
    stalled = servers("--db", str(db), "--workers", "1", "--lease", "1")
    client = webtest.TestApp(make(db=db, workers=0))
    token = tokens_of(submit(client, [{"item": "a", "valor": 2}]))[0]
    wait_until(lambda: client.get(f"/check/{token}").json["status"] == "running")
    stalled.process.send_signal(signal.SIGSTOP)  # alive, but renews nothing
    try:
        rescuer = make(db=db, workers=1, lease=1)
        rescuer.start()
        view = client.get(f"/check/{token}?wait=20", status=200).json
        assert (view["status"], view["attempts"]) == ("done", 2)
    finally:
        stalled.process.send_signal(signal.SIGCONT)
    assert stalled.stop() == 0
    assert client.get(f"/check/{token}", status=200).json["attempts"] == 2


GUNICORN_APP = """
import os
import queue_tool

def record(job):
    with open(os.environ["RECORD_FILE"], "a") as out:
        out.write(f"{job.token} {os.getpid()}\\n")

app = queue_tool.make_app(db=os.environ["RECORD_DB"], workers=4, process=record)
"""


@both_stores
def test_gunicorn_workers_run_every_job_exactly_once(gunicorn, tmp_path, db):
    (tmp_path / "record_app.py").write_text(GUNICORN_APP)
    record = tmp_path / "record.txt"
    server = gunicorn("record_app:app", workers=3, env={
        "RECORD_FILE": str(record), "RECORD_DB": str(db)})
    batches = [[{"item": f"{b}-{n}", "valor": 0} for n in range(10)] for b in range(30)]
    tokens = []

    def send(some):
        for batch in some:
            status, body = server.request("POST", "/api", batch)
            assert status == 202
            tokens.extend(entry["hash"] for entry in body["processing_items"])
    senders = [threading.Thread(target=send, args=(batches[n:n + 5],)) for n in range(0, 30, 5)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(60)
    assert len(tokens) == len(set(tokens)) == 300
    for token in tokens:
        assert server.request("GET", f"/check/{token}?wait=20")[1]["status"] == "done"
    recorded = [line.split() for line in record.read_text().splitlines()]
    assert sorted(token for token, _ in recorded) == sorted(tokens)  # each exactly once
    print("jobs run per gunicorn worker:",
          sorted(collections.Counter(pid for _, pid in recorded).values()))
    assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def test_gunicorn_serves_the_module_app_from_the_environment(gunicorn, tmp_path):
    db = tmp_path / "env.sqlite3"
    server = gunicorn("queue_tool:app", "--preload", env={
        "QUEUE_TOOL_DB": str(db), "QUEUE_TOOL_WORKERS": "2", "QUEUE_TOOL_API_KEY": "k"})
    key = {"Authorization": "Bearer k"}
    assert server.request("POST", "/api", [{"item": "a", "valor": 1}])[0] == 401
    status, body = server.request("POST", "/api", [{"item": "a", "valor": 0.1}] * 4, key)
    assert status == 202
    for entry in body["processing_items"]:
        assert server.request("GET", f"/check/{entry['hash']}?wait=10")[1]["status"] == "done"
    assert db.exists()
    assert server.stop() == 0


def test_gunicorn_with_a_bad_variable_answers_500_misconfigured(gunicorn, tmp_path):
    server = gunicorn("queue_tool:app", env={"QUEUE_TOOL_MAX_ITEMS": "none"})
    for path in ("/health", "/api", "/check/" + UNKNOWN_TOKEN):
        status, body = server.request("GET", path)
        assert status == 500 and body["error"] == "misconfigured"
        assert "QUEUE_TOOL_MAX_ITEMS: max_items must be a whole number" in body["message"]
    assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def test_waitress_serves_the_module_app(tmp_path):
    program = shutil.which("waitress-serve", path=str(Path(sys.executable).parent)) or \
        shutil.which("waitress-serve")
    assert program, "waitress is in the test extra"
    env = {**os.environ, "PYTHONPATH": str(HERE), "QUEUE_TOOL_DB": str(tmp_path / "w.sqlite3"),
           "QUEUE_TOOL_WORKERS": "2"}
    server = Server(tmp_path, [program, "--listen=127.0.0.1:0", "queue_tool:app"],
                    name="waitress", env=env, ready=r"Serving on (http://127\.0\.0\.1:\d+)")
    try:
        status, body = server.request("POST", "/api", [{"item": "a", "valor": 0.1}] * 3)
        assert status == 202
        for entry in body["processing_items"]:
            status, view = server.request("GET", f"/check/{entry['hash']}?wait=10")
            assert (status, view["message"]) == (200, "Finalizado")
    finally:
        server.stop()


def test_served_with_a_bad_variable_exits_2_before_binding(tmp_path):
    out = subprocess.run(
        [sys.executable, str(HERE / "queue_tool.py"), "--port", "0"], check=False,
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "QUEUE_TOOL_WORKERS": "-1"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2
    assert lines[0].startswith("usage:") and "QUEUE_TOOL_WORKERS: workers must be" in lines[1]
    assert list(tmp_path.iterdir()) == []  # not even the default database was created


# -- Operations: health, metrics, OpenAPI ------------------------------------------------

@both_stores
def test_health_reports_workers_and_queue_depth(make, gated, seen):
    client = webtest.TestApp(make(process=gated, workers=2))
    submit(client, [{"item": "a", "valor": 1}] * 5)
    started_jobs(seen, 2)
    assert client.get("/health", status=200).json == {
        "status": "ok", "workers": 2, "queued": 3, "running": 2}


def break_the_database(built, tmp_path):
    """Overwrite the real database file with garbage, as a failed disk would."""
    built.store.close(final=False)
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / "q.sqlite3") + suffix).unlink(missing_ok=True)
    (tmp_path / "q.sqlite3").write_bytes(b"this is not an SQLite database" * 200)


@pytest.mark.parametrize("method, path", [
    ("GET", "/health"), ("POST", "/api"), ("GET", f"/check/{UNKNOWN_TOKEN}"), ("GET", "/jobs")])
def test_unreadable_store_is_503_store_unavailable(make, tmp_path, method, path):
    built = make(workers=0)
    client = webtest.TestApp(built)
    client.get("/health", status=200)
    break_the_database(built, tmp_path)
    body = b'[{"item": "a", "valor": 1}]' if method == "POST" else None
    response = client.request(path, method=method, body=body, status=503,
                              content_type="application/json")
    assert response.json == {"message": "the job store cannot be used",
                             "error": "store_unavailable"}


METRIC_TYPES = {"queue_tool_jobs_submitted": "counter", "queue_tool_items_invalid": "counter",
                "queue_tool_items_duplicate": "counter", "queue_tool_jobs_finished": "counter",
                "queue_tool_jobs_retried": "counter", "queue_tool_jobs": "gauge",
                "queue_tool_workers": "gauge", "queue_tool_queue_jobs": "gauge",
                "queue_tool_job_wait_seconds": "histogram",
                "queue_tool_job_run_seconds": "histogram"}


def scrape(client, families=None):
    """/metrics as the official parser reads it: {'name{label="value",...}': value}, the
    labels in name order; `families`, when given, gets {family name: its samples}."""
    from prometheus_client.parser import text_string_to_metric_families
    response = client.get("/metrics", status=200)
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples, typed = {}, {}
    for family in text_string_to_metric_families(response.text):
        typed[family.name] = family.type
        if families is not None:
            families[family.name] = family.samples
        for sample in family.samples:
            labels = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = value
    assert typed == METRIC_TYPES
    return samples


@both_stores
def test_metrics_count_exactly_what_happened(make, gate, seen, gated):
    def process(job):
        if job.item == "fail":
            raise RuntimeError("no")
        return gated(job)
    built = make(process=process, workers=1)
    client = webtest.TestApp(built)
    before = scrape(client)
    assert before["queue_tool_workers"] == 1
    tokens = tokens_of(submit(client, [
        {"item": "fail", "valor": 0}, {"item": "run", "valor": 0}, {"item": "cancel", "valor": 0},
        {"item": "done", "valor": 0}, {"item": "bad"}, {"valor": 2}, 7]))
    _failing, running, canceled, done = tokens
    wait_until(lambda: client.get(f"/check/{running}").json["status"] == "running")
    during = scrape(client)
    assert during['queue_tool_jobs{status="running"}'] == 1
    assert during['queue_tool_jobs{status="queued"}'] == 2
    client.delete(f"/check/{canceled}", status=200)
    gate.set()
    client.get(f"/check/{done}?wait=10", status=200)
    after = scrape(client)
    assert after["queue_tool_jobs_submitted_total"] - before["queue_tool_jobs_submitted_total"] == 4
    assert after["queue_tool_items_invalid_total"] - before["queue_tool_items_invalid_total"] == 3
    finished = {state: after[f'queue_tool_jobs_finished_total{{status="{state}"}}']
                for state in ("done", "failed", "canceled")}
    assert finished == {"done": 2, "failed": 1, "canceled": 1}
    assert after['queue_tool_jobs{status="queued"}'] == after[
        'queue_tool_jobs{status="running"}'] == 0


@both_stores
def test_metrics_agree_across_processes_and_survive_restart_and_purge(make):
    first = make(workers=1, retention=0.2)
    client = webtest.TestApp(first)
    token = tokens_of(submit(client, [{"item": "a", "valor": 0}, {"item": "b"}]))[0]
    client.get(f"/check/{token}?wait=5", status=200)
    wait_until(lambda: client.get(f"/check/{token}", expect_errors=True).status_int == 404)
    first.close()
    other = scrape(webtest.TestApp(make(workers=0)))
    assert other["queue_tool_jobs_submitted_total"] == 1
    assert other["queue_tool_items_invalid_total"] == 1
    assert other['queue_tool_jobs_finished_total{status="done"}'] == 1
    assert other["queue_tool_workers"] == 0


def test_openapi_document_is_valid_openapi_3_1(client):
    from openapi_spec_validator import validate
    document = client.get("/openapi.json", status=200).json
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {"/", "/api", "/check/{token}", "/batch/{id}", "/jobs", "/health",
                                      "/metrics", "/openapi.json", "/schedules",
                                      "/schedules/{name}", "/check/{token}/retry",
                                      "/jobs/retry", "/jobs/cancel", "/queues",
                                      "/queues/{name}", "/workers"}


def test_openapi_item_schema_is_the_validators_own_dict(make):
    built = make(workers=0, max_valor=7)
    document = webtest.TestApp(built).get("/openapi.json", status=200).json
    assert built.validator.schema is built.schema
    assert document["components"]["schemas"]["Item"] == built.schema
    posted = document["paths"]["/api"]["post"]["requestBody"]["content"]["application/json"]
    assert posted["schema"]["items"] == built.schema
    assert built.schema["properties"]["valor"]["maximum"] == 7


def documented_statuses(document):
    return {(path, method.upper(), int(status))
            for path, methods in document["paths"].items()
            for method, operation in methods.items()
            for status in operation["responses"]}


def test_every_documented_status_is_one_the_app_returns(make, tmp_path):
    built = make(workers=0, api_key="k", max_items=2, max_body=200, max_queued=2)
    client = webtest.TestApp(built)
    key = {"Authorization": "Bearer k"}
    json_type = "application/json"
    first = submit(client, [{"item": "a", "valor": 1}] * 2, headers=key)
    token, done = tokens_of(first)
    batch = first.json["batch"]
    client.delete(f"/check/{done}", headers=key, status=200)
    submit(client, [{"item": "x"}], headers={**key, "Idempotency-Key": "used"})  # queues none
    every = json.dumps({"every": 60, "job": {"item": "s", "valor": 0}}).encode()
    client.put("/schedules/kept", every, headers=key, content_type=json_type, status=201)
    client.put("/schedules/gone", every, headers=key, content_type=json_type, status=201)
    examples = {
        ("/api", "POST", 202): {"body": b'[{"item": "a", "valor": 1}]', "headers": key},
        ("/api", "POST", 400): {"body": b"[]", "headers": key},
        ("/api", "POST", 401): {"body": b"[]"},
        ("/api", "POST", 413): {"body": b"[1, 2, 3]", "headers": key},
        ("/api", "POST", 415): {"body": b"[]", "headers": key, "content_type": "text/plain"},
        ("/api", "POST", 422): {"body": b'[{"item": "y"}]',
                                "headers": {**key, "Idempotency-Key": "used"}},
        ("/api", "POST", 503): {"body": b'[{"item": "a", "valor": 1}]', "headers": key},
        ("/check/{token}", "GET", 200): {"path": f"/check/{token}"},
        ("/check/{token}", "GET", 400): {"path": f"/check/{token}?wait=0"},
        ("/check/{token}", "GET", 404): {"path": f"/check/{UNKNOWN_TOKEN}"},
        ("/check/{token}", "DELETE", 200): {"path": f"/check/{token}", "headers": key},
        ("/check/{token}", "DELETE", 401): {"path": f"/check/{token}"},
        ("/check/{token}", "DELETE", 404): {"path": f"/check/{UNKNOWN_TOKEN}", "headers": key},
        ("/check/{token}", "DELETE", 409): {"path": f"/check/{done}", "headers": key},
        ("/batch/{id}", "GET", 200): {"path": f"/batch/{batch}"},
        ("/batch/{id}", "GET", 400): {"path": f"/batch/{batch}?wait=31"},
        ("/batch/{id}", "GET", 404): {"path": f"/batch/{UNKNOWN_TOKEN}"},
        ("/batch/{id}", "DELETE", 200): {"path": f"/batch/{batch}", "headers": key},
        ("/batch/{id}", "DELETE", 401): {"path": f"/batch/{batch}"},
        ("/batch/{id}", "DELETE", 404): {"path": f"/batch/{UNKNOWN_TOKEN}", "headers": key},
        ("/jobs", "GET", 200): {"headers": key},
        ("/jobs", "GET", 400): {"path": "/jobs?limit=0", "headers": key},
        ("/jobs", "GET", 401): {},
        ("/check/{token}/retry", "POST", 200): {"path": f"/check/{done}/retry", "headers": key},
        ("/check/{token}/retry", "POST", 401): {"path": f"/check/{done}/retry"},
        ("/check/{token}/retry", "POST", 404): {"path": f"/check/{UNKNOWN_TOKEN}/retry",
                                                "headers": key},
        ("/check/{token}/retry", "POST", 409): {"path": f"/check/{done}/retry", "headers": key},
        ("/jobs/retry", "POST", 200): {"headers": key},
        ("/jobs/retry", "POST", 400): {"path": "/jobs/retry?status=done", "headers": key},
        ("/jobs/retry", "POST", 401): {},
        ("/jobs/cancel", "POST", 200): {"path": "/jobs/cancel?status=running", "headers": key},
        ("/jobs/cancel", "POST", 400): {"path": "/jobs/cancel?status=done", "headers": key},
        ("/jobs/cancel", "POST", 401): {},
        ("/schedules", "GET", 200): {"headers": key},
        ("/schedules", "GET", 401): {},
        ("/schedules/{name}", "GET", 200): {"path": "/schedules/kept", "headers": key},
        ("/schedules/{name}", "GET", 401): {"path": "/schedules/kept"},
        ("/schedules/{name}", "GET", 404): {"path": "/schedules/nope", "headers": key},
        ("/schedules/{name}", "PUT", 200): {"path": "/schedules/kept", "body": every,
                                            "headers": key},
        ("/schedules/{name}", "PUT", 201): {"path": "/schedules/new", "body": every,
                                            "headers": key},
        ("/schedules/{name}", "PUT", 400): {"path": "/schedules/bad", "body": b"{}",
                                            "headers": key},
        ("/schedules/{name}", "PUT", 401): {"path": "/schedules/kept", "body": every},
        ("/schedules/{name}", "PUT", 415): {"path": "/schedules/kept", "body": every,
                                            "headers": key, "content_type": "text/plain"},
        ("/schedules/{name}", "DELETE", 200): {"path": "/schedules/gone", "headers": key},
        ("/schedules/{name}", "DELETE", 401): {"path": "/schedules/gone"},
        ("/schedules/{name}", "DELETE", 404): {"path": "/schedules/nope", "headers": key},
        ("/queues", "GET", 200): {"headers": key},
        ("/queues", "GET", 401): {},
        ("/queues/{name}", "GET", 200): {"path": "/queues/default", "headers": key},
        ("/queues/{name}", "GET", 400): {"path": "/queues/Bad", "headers": key},
        ("/queues/{name}", "GET", 401): {"path": "/queues/default"},
        ("/queues/{name}", "GET", 404): {"path": "/queues/nope", "headers": key},
        ("/queues/{name}", "PATCH", 200): {"path": "/queues/mail", "body": b"{}",
                                           "headers": key},
        ("/queues/{name}", "PATCH", 400): {"path": "/queues/mail", "body": b"[]",
                                           "headers": key},
        ("/queues/{name}", "PATCH", 401): {"path": "/queues/mail", "body": b"{}"},
        ("/queues/{name}", "PATCH", 415): {"path": "/queues/mail", "body": b"{}",
                                           "headers": key, "content_type": "text/plain"},
        ("/workers", "GET", 200): {"headers": key},
        ("/workers", "GET", 401): {},
        ("/health", "GET", 200): {},
        ("/metrics", "GET", 200): {"headers": key},
        ("/metrics", "GET", 401): {},
        ("/openapi.json", "GET", 200): {},
        ("/", "GET", 200): {},
    }
    document = client.get("/openapi.json", status=200).json
    assert documented_statuses(document) - {("/health", "GET", 503)} == set(examples)
    for (path, method, status), request in examples.items():
        client.request(request.get("path", path), method=method, body=request.get("body"),
                       headers=request.get("headers", {}), status=status,
                       content_type=request.get("content_type", json_type))
    # /health's 503 needs a broken database, so it goes last
    break_the_database(built, tmp_path)
    client.get("/health", status=503)


# -- Limits ------------------------------------------------------------------------------

class CountingInput:
    """A wsgi.input that counts what is read from it."""

    def __init__(self, data):
        self.stream, self.taken = io.BytesIO(data), 0

    def read(self, size=-1):
        chunk = self.stream.read(size)
        self.taken += len(chunk)
        return chunk


def test_body_over_max_body_is_refused_before_reading(make):
    built = make(workers=0, max_body=100)
    stream = CountingInput(b"[" + b"1," * 60 + b"1]")
    status, _, body = call(built, "POST", "/api", CONTENT_TYPE="application/json",
                           CONTENT_LENGTH="101", **{"wsgi.input": stream})
    assert (status, body["error"]) == (413, "body_too_large")
    assert stream.taken == 0


def test_chunked_body_is_cut_off_just_past_max_body(make):
    built = make(workers=0, max_body=100)
    stream = CountingInput(b'[{"item": "a", "valor": 1}' + b", 1" * 100_000 + b"]")
    status, _, body = call(built, "POST", "/api", CONTENT_TYPE="application/json",
                           **{"wsgi.input": stream, "wsgi.input_terminated": True})
    assert (status, body["error"]) == (413, "body_too_large")
    assert stream.taken == 101
    assert built.store.list()[0] == []


def test_chunked_body_within_max_body_is_read_whole(make):
    built = make(workers=0)
    payload = json.dumps([{"item": "a", "valor": 1}] * 50).encode()
    status, _, body = call(built, "POST", "/api", payload, CONTENT_TYPE="application/json",
                           **{"wsgi.input_terminated": True})
    assert status == 202 and len(tokens_of_body(body)) == 50


def tokens_of_body(body):
    return [e["hash"] for e in body["processing_items"] if e["hash"] != "INVALID_JOB_REQUEST"]


def test_body_of_exactly_max_body_is_accepted(make):
    payload = json.dumps([{"item": "a", "valor": 1}]).encode()
    client = webtest.TestApp(make(workers=0, max_body=len(payload)))
    client.post("/api", payload, content_type="application/json", status=202)
    client.post("/api", payload + b" ", content_type="application/json", status=413)


def test_too_many_items_is_413_and_queues_nothing(make):
    built = make(workers=0, max_items=3)
    client = webtest.TestApp(built)
    submit(client, [{"item": "a", "valor": 1}] * 3)
    response = submit(client, [{"item": "a", "valor": 1}] * 4, status=413)
    assert response.json["error"] == "too_many_items"
    assert len(built.store.list()[0]) == 3


@both_stores
def test_full_queue_refuses_the_whole_batch_with_retry_after(make, gated, seen, db):
    built = make(process=gated, workers=1, max_queued=3)
    client = webtest.TestApp(built)
    submit(client, [{"item": "runs", "valor": 1}])
    started_jobs(seen, 1)  # running jobs do not count against max_queued
    submit(client, [{"item": "a", "valor": 1}] * 2 + [{"item": "invalid"}])
    response = submit(client, [{"item": "b", "valor": 1}] * 2, status=503)
    assert response.json["error"] == "queue_full"
    assert int(response.headers["Retry-After"]) >= 1
    assert client.get("/health").json["queued"] == 2
    submit(client, [{"item": "c", "valor": 1}])
    assert client.get("/health").json["queued"] == 3
    assert built.store.counters()["submitted"] == 4
    assert_queued_gauge_is_true(db)


# -- API key --------------------------------------------------------------------------------

@pytest.fixture
def keyed(make):
    return webtest.TestApp(make(workers=0, api_key="s3cret-key"))


GUARDED = [("POST", "/api"), ("DELETE", f"/check/{UNKNOWN_TOKEN}"), ("GET", "/jobs"),
           ("GET", "/metrics"), ("DELETE", f"/batch/{UNKNOWN_TOKEN}"), ("GET", "/schedules"),
           ("GET", "/schedules/a"), ("PUT", "/schedules/a"), ("DELETE", "/schedules/a"),
           ("POST", f"/check/{UNKNOWN_TOKEN}/retry"), ("POST", "/jobs/retry"),
           ("POST", "/jobs/cancel"), ("GET", "/queues"), ("GET", "/queues/a"),
           ("PATCH", "/queues/a"), ("GET", "/workers")]


@pytest.mark.parametrize("method, path", GUARDED)
@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer wrong", "Bearer s3cret-ke", "Bearer s3cret-key2",
    "Basic s3cret-key", "s3cret-key"])
def test_guarded_routes_need_the_key(keyed, method, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = keyed.request(path, method=method, headers=headers, body=b"junk",
                             content_type="text/plain", status=401)
    assert response.json["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_key_opens_guarded_routes(keyed, scheme):
    headers = {"Authorization": f"{scheme} s3cret-key"}
    token = tokens_of(submit(keyed, [{"item": "a", "valor": 1}], headers=headers))[0]
    keyed.get("/jobs", headers=headers, status=200)
    keyed.get("/metrics", headers=headers, status=200)
    keyed.delete(f"/check/{token}", headers=headers, status=200)


def test_open_routes_need_no_key(keyed):
    keyed.get("/health", status=200)
    keyed.get("/openapi.json", status=200)
    keyed.get(f"/check/{UNKNOWN_TOKEN}", status=404)


def test_key_is_checked_before_the_body(keyed):
    """A request without the key learns nothing about its body (SPEC's order of checks)."""
    response = keyed.post("/api", b"x" * 10, content_type="text/plain", status=401)
    assert response.json["error"] == "unauthorized"


def test_openapi_marks_guarded_routes_when_a_key_is_set(keyed, client):
    guarded = keyed.get("/openapi.json").json["paths"]
    assert guarded["/api"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in guarded["/health"]["get"]
    assert "security" not in client.get("/openapi.json").json["paths"]["/api"]["post"]


def test_openapi_document_says_what_the_app_enforces(keyed):
    """The document's patterns and guarded routes are the ones the App uses."""
    document = keyed.get("/openapi.json", status=200).json
    built = keyed.app
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            url = path.replace("{token}", UNKNOWN_TOKEN).replace("{id}", UNKNOWN_TOKEN).replace(
                "{name}", "nightly")
            status = keyed.request(url, method=method.upper(), expect_errors=True).status_int
            assert (status == 401) == ("security" in operation), (method, path, status)
    path_patterns = {parameter["name"]: parameter["schema"]["pattern"]
                     for methods in document["paths"].values() for operation in methods.values()
                     for parameter in operation.get("parameters", ()) if parameter["in"] == "path"}
    token_pattern = path_patterns["token"]
    assert path_patterns["id"] == token_pattern  # a token and a batch id alike
    assert path_patterns["name"] == queue_tool.QUEUE_PATTERN  # a schedule's, as a queue's
    for candidate in [UNKNOWN_TOKEN, "a" * 31, "a" * 33, "A" * 32, UNKNOWN_TOKEN + "\n", "g" * 32]:
        documented = queue_tool.ecma_regex(token_pattern).search(candidate) is not None
        status, _, body = call(built, "GET", "/check/" + candidate)
        # Both answer 404; only a well-formed token gets as far as the store.
        assert documented == bool(queue_tool.TOKEN_RE.match(candidate)), candidate
        assert status == 404 and body["error"] == "not_found"
    (key_parameter,) = document["paths"]["/api"]["post"]["parameters"]
    key_pattern = queue_tool.ecma_regex(key_parameter["schema"]["pattern"])
    auth = {"HTTP_AUTHORIZATION": "Bearer s3cret-key", "CONTENT_TYPE": "application/json"}
    for key in ["k", "x" * 255, "x" * 256, "", "tab\there", "caf\u00e9", "ok key ~", "end\n"]:
        status, _, body = call(built, "POST", "/api", b"[]", HTTP_IDEMPOTENCY_KEY=key, **auth)
        refused = body.get("error") == "invalid_idempotency_key"
        assert refused == (key_pattern.search(key) is None), (key, status, body)
    waits = [parameter for methods in document["paths"].values()
             for operation in methods.values() for parameter in operation.get("parameters", ())
             if parameter["name"] == "wait"]
    assert len(waits) == 2 and waits[0] == waits[1]
    assert waits[0]["schema"]["maximum"] == queue_tool.MAX_WAIT


# -- Logs ----------------------------------------------------------------------------------

def test_one_access_line_per_request_without_the_query(client, caplog):
    caplog.set_level("INFO", logger="queue_tool")
    token = tokens_of(submit(client, [{"item": "a", "valor": 1}]))[0]
    client.get(f"/check/{token}?wait=0.01&secret=hunter2", status=200)
    client.get("/nope", status=404)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().split()[0] in (
        "GET", "POST")]
    assert len(lines) == 3
    assert re.fullmatch(r"POST /api 202 \d+\.\dms", lines[0])
    assert re.fullmatch(rf"GET /check/{token} 200 \d+\.\dms", lines[1])
    assert "hunter2" not in caplog.text and "wait=" not in caplog.text
    assert re.fullmatch(r"GET /nope 404 \d+\.\dms", lines[2])


def test_job_transitions_are_logged(make, caplog, gated, seen, gate):
    caplog.set_level("DEBUG", logger="queue_tool")  # a job's start and end are debug lines
    built = make(process=gated, workers=1)
    client = webtest.TestApp(built)
    first, second = tokens_of(submit(client, [{"item": "a", "valor": 1}] * 2))
    started_jobs(seen, 1)
    client.delete(f"/check/{first}", status=200)
    gate.set()
    client.get(f"/check/{second}?wait=5", status=200)
    text = caplog.text
    for line in (f"job {first} running (attempt 1)", f"job {first} canceled",
                 f"job {second} running (attempt 1)", f"job {second} done in"):
        assert line in text


def test_debug_logs_request_tracebacks(make, caplog):
    built = make(workers=0, debug=True)

    def broken(*args):
        raise RuntimeError("boom")
    built.store.counts = broken
    webtest.TestApp(built).get("/health", status=500)
    assert "Traceback" in caplog.text and "RuntimeError: boom" in caplog.text


# -- Property: no input breaks it --------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
item_like = st.fixed_dictionaries(
    {"item": st.one_of(st.text(max_size=12), json_values),
     "valor": st.one_of(st.integers(-2, 4000), st.floats(-1, 4000), st.booleans(), json_values)},
    optional={
        "delay": st.one_of(st.integers(-1, 2_600_000), st.floats(-1, 3e6), json_values),
        "priority": st.one_of(st.integers(-12, 12), st.floats(-11, 11), st.booleans(),
                              json_values),
        "queue": st.one_of(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,66}", fullmatch=True),
                           st.sampled_from(["a\n", "A", "-a", "", "default"]), json_values),
        "retries": st.one_of(st.integers(-1, 27), st.floats(-1, 26), json_values)})
# Items with the unique and expiry options, mostly well-formed ones: keys from a few,
# so that duplicates happen.
keyed_like = st.fixed_dictionaries(
    {"item": st.text(min_size=1, max_size=6), "valor": st.integers(0, 5)},
    optional={
        "unique": st.one_of(st.sampled_from(["k", "j", "x" * 256, "\t", ""]), json_values),
        "unique_for": st.one_of(st.integers(-1, 2_600_000), st.floats(-1, 3e6), json_values),
        "expires": st.one_of(st.integers(-1, 2_600_000), st.floats(-1, 3e6), json_values)})
schedule_like = st.fixed_dictionaries({}, optional={
    "cron": st.one_of(st.sampled_from(["* * * * *", "0 9 * * mon-fri", "@daily", "61 * * * *",
                                       "0 0 30 2 *", "*/0 * * * *", "a b c d e", ""]),
                      st.text(max_size=12), json_values),
    "every": st.one_of(st.integers(-1, 40_000_000), st.floats(-1, 4e7), json_values),
    "timezone": st.one_of(st.sampled_from(["UTC", "Asia/Kolkata", "Nowhere/Else", "",
                                           "../etc"]), st.text(max_size=8), json_values),
    "job": st.one_of(item_like, json_values), "paused": st.one_of(st.booleans(), json_values)})
bodies = st.one_of(
    st.lists(st.one_of(item_like, keyed_like, json_values), max_size=6).map(
        lambda batch: json.dumps(batch).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    schedule_like.map(lambda schedule: json.dumps(schedule).encode()),
    st.binary(max_size=120))
paths = st.one_of(
    st.sampled_from(["/api", "/jobs", "/health", "/metrics", "/openapi.json", "/",
                     f"/check/{UNKNOWN_TOKEN}", "/check/", "/api/", "/schedules",
                     "/schedules/", "/schedules/a", "/schedules/Bad", "/schedules/a/b"]),
    st.text(max_size=24).map(lambda text: "/" + text),
    st.text(alphabet="0123456789abcdef", min_size=31, max_size=33).map(
        lambda text: "/check/" + text))
queries = st.one_of(st.just(""), st.text(max_size=24), st.sampled_from([
    "wait=", "wait=0.01", "wait=abc", "limit=2", "limit=0", "status=queued", "status=x",
    "before=YmVmb3JlOjE", "before=zz"]))
content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8",
                                 "text/plain", "", "application/x+json", "multipart/form-data"])
lengths = st.one_of(st.none(), st.sampled_from(["", "abc", "-1", "99999999", "0"]))


def wsgi_text(text):
    """A str as a WSGI server puts it in the environ: UTF-8 bytes read as latin-1."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


api_posts = st.fixed_dictionaries({
    "method": st.just("POST"), "path": st.just("/api"), "query": st.just(""), "body": bodies,
    "content_type": st.sampled_from([None, "application/json"]), "length": st.none()})
any_requests = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS"]),
    "path": paths, "query": queries, "body": bodies, "content_type": content_types,
    "length": lengths})


def test_no_request_breaks_the_app(make, db):
    """Never a 5xx, always a JSON error body, and the store holds exactly what was accepted."""
    built = make(workers=0, max_body=4096)
    accepted, statuses = set(), collections.Counter()

    @hypothesis.settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @hypothesis.given(request=st.one_of(api_posts, any_requests))
    def check(request):
        body = request["body"]
        length = request["length"]
        env = {"REQUEST_METHOD": request["method"], "PATH_INFO": wsgi_text(request["path"]),
               "QUERY_STRING": wsgi_text(request["query"]), "wsgi.input": io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body)) if length is None else length}
        if request["content_type"] is not None:
            env["CONTENT_TYPE"] = request["content_type"]
        wsgiref.util.setup_testing_defaults(env)
        answer = {}

        def start_response(status, headers, exc_info=None):
            answer["status"], answer["headers"] = int(status.split()[0]), dict(headers)
        payload = b"".join(built(env, start_response))
        status, headers = answer["status"], answer["headers"]
        statuses[status] += 1
        assert status < 500, payload
        assert headers["X-Content-Type-Options"] == "nosniff"
        if request["method"] != "HEAD":
            assert int(headers["Content-Length"]) == len(payload)
        if status >= 400 and request["method"] != "HEAD":
            error = json.loads(payload)
            assert set(error) == {"message", "error"}
            assert isinstance(error["message"], str) and re.fullmatch(r"[a-z_]+", error["error"])
        if status == 202:
            accepted.update(tokens_of_body(json.loads(payload)))
        submitted = {job["token"] for job in built.store.list(limit=100_000)[0]
                     if job["schedule"] is None}  # a schedule put here may make jobs
        assert submitted == accepted
        assert_queued_gauge_is_true(db)

    check()
    # the property was exercised on both sides: requests accepted and refused
    assert statuses[202] >= 50 and statuses[400] >= 50 and statuses[404] >= 20, statuses
    assert accepted
    print("statuses seen:", dict(sorted(statuses.items())), "accepted:", len(accepted))


@hypothesis.settings(max_examples=1500, deadline=None, derandomize=True, database=None)
@hypothesis.given(item=st.one_of(item_like, keyed_like, json_values),
                  max_valor=st.sampled_from([0, 5, 3600]))
def test_fast_check_agrees_with_the_validator(item, max_valor):
    schema = queue_tool.item_schema(max_valor)
    fast = queue_tool.compile_fast_check(schema)
    assert fast(item) == queue_tool.compile_schema(schema).is_valid(item)


def test_fast_check_steps_aside_for_keywords_it_does_not_know():
    closed = {**queue_tool.ITEM_SCHEMA, "additionalProperties": False}
    assert queue_tool.compile_fast_check(closed) is None
    formatted = queue_tool.item_schema()
    formatted["properties"]["item"]["format"] = "email"
    assert queue_tool.compile_fast_check(formatted) is None
    assert queue_tool.compile_fast_check(queue_tool.ITEM_SCHEMA) is not None


# -- Dashboard -------------------------------------------------------------------------------

def test_dashboard_is_one_page_under_a_nonce_csp(client):
    first, second = client.get("/", status=200), client.get("/", status=200)
    assert first.content_type == "text/html"
    policy = first.headers["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([A-Za-z0-9_-]+)'", policy)[1]
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert f'<script nonce="{nonce}">' in first.text and f'<style nonce="{nonce}">' in first.text
    assert first.text.count("<script") == 1
    assert nonce not in second.text  # a fresh nonce for every response
    assert not re.search(r"(src|href)=\"(https?:)?//", first.text)  # no external asset
    assert "innerHTML" not in first.text and "insertAdjacentHTML" not in first.text


def test_dashboard_stays_open_with_a_key(keyed):
    assert "queue_tool" in keyed.get("/", status=200).text
    assert keyed.head("/", status=200).body == b""


def test_dashboard_knows_its_mount_point(app):
    response = webtest.TestApp(app).get("/", extra_environ={"SCRIPT_NAME": "/queue"},
                                        status=200)
    assert 'data-base="/queue"' in response.text


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def browser(tmp_path):
    """Pages in headless Chromium (Debian's), with a fresh profile; problems recorded,
    and on each page the URLs it asked for (`page.requested`) and the CSP violations
    (`window.violations`)."""
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: install {CHROMIUM} and playwright")
        pytest.skip(f"the browser tests need {CHROMIUM} (Debian's chromium) and playwright")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        problems = []

        def open_page(url):
            page = context.new_page()
            page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"),
                                              dialog.dismiss()))
            page.on("console", lambda message: message.type == "error" and problems.append(
                f"console: {message.text}"))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.requested = []  # every URL it asks for
            page.on("request", lambda request: page.requested.append(request.url))
            page.add_init_script("""window.violations = [];
                document.addEventListener("securitypolicyviolation",
                                          (event) => window.violations.push(event.violatedDirective));""")
            page.goto(url)
            return page
        open_page.problems = problems
        yield open_page
        context.close()


def test_dashboard_in_chromium_submits_follows_and_cancels(servers, browser, tmp_path):
    from playwright.sync_api import expect
    server = servers("--db", str(tmp_path / "ui.sqlite3"), "--workers", "2")
    page = browser(server.url + "/")
    page.click("#add-row")
    page.click("#add-row")
    rows = page.locator("#rows .row")
    expect(rows).to_have_count(4)
    for n, (item, valor) in enumerate([("quick", "0.5"), ("long", "3600"), (XSS, "0"),
                                       ("no valor", "")]):
        rows.nth(n).locator(".item").fill(item)
        rows.nth(n).locator(".valor").fill(valor)
    page.click("#send")

    results = page.locator("#results li")
    expect(results).to_have_count(5)  # one line per item, then the batch
    expect(results.nth(3)).to_contain_text("invalid: 'valor' is a required property")
    expect(results.nth(4)).to_contain_text("batch")
    expect(results.nth(0)).to_contain_text("queued")
    jobs = page.locator("#jobs tr")
    expect(jobs).to_have_count(3)  # the invalid item was not queued

    quick = page.locator("#jobs tr", has_text="quick")
    expect(quick.locator(".badge")).to_have_text("Finalizado", timeout=15_000)
    long = page.locator("#jobs tr", has_text="long")
    expect(long.locator(".badge")).to_have_text("Em processamento")
    expect(long.locator("progress")).to_have_count(1)
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    long.locator("button", has_text="Cancel").click()
    expect(long.locator(".badge")).to_have_text("Cancelado")
    expect(page.locator("#n-canceled")).to_have_text("1")
    expect(page.locator("#n-done")).to_have_text("2")
    token = long.get_attribute("data-token")
    assert server.request("GET", f"/check/{token}")[1]["status"] == "canceled"

    hostile = page.locator("#jobs td.item", has_text="onerror")
    expect(hostile).to_have_text(XSS)  # shown as text ...
    assert page.locator("img").count() == 0  # ... never as an element

    page.set_viewport_size({"width": 390, "height": 844})
    expect(quick.locator(".badge")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=tmp_path / "dashboard-phone.png", full_page=True)
    assert browser.problems == []
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_dashboard_in_chromium_takes_pasted_json_and_filters(servers, browser, tmp_path):
    from playwright.sync_api import expect
    server = servers("--db", str(tmp_path / "ui.sqlite3"), "--workers", "1")
    page = browser(server.url + "/")
    page.click("summary")
    page.fill("#batch-json", json.dumps([{"item": "pasted", "valor": 3600},
                                         {"item": "too long", "valor": 99999}]))
    page.click("#send")
    expect(page.locator("#results li").nth(1)).to_contain_text(
        "99999 is greater than the maximum of 3600")
    expect(page.locator("#jobs tr", has_text="pasted")).to_have_count(1)
    page.select_option("#filter", "done")
    expect(page.locator("#jobs-note")).to_have_text("No jobs here yet.")
    expect(page.locator("#jobs tr")).to_have_count(0)
    page.select_option("#filter", "running")
    expect(page.locator("#jobs tr", has_text="pasted")).to_have_count(1)
    page.fill("#batch-json", "[oops")
    page.click("#send")
    expect(page.locator("#results li.error")).to_contain_text("the body is not valid JSON")
    expect(page.locator("#results li")).to_have_count(1)
    # the browser logs the expected 400; nothing else went wrong
    assert all("status of 400" in problem for problem in browser.problems), browser.problems


def test_dashboard_in_chromium_sets_job_options_and_shows_them(servers, browser, tmp_path):
    from playwright.sync_api import expect
    server = servers("--db", str(tmp_path / "ui.sqlite3"), "--workers", "1")
    page = browser(server.url + "/")
    page.locator("#rows .item").first.fill("later")
    page.locator("#rows .valor").first.fill("1")
    page.fill("#opt-delay", "3600")
    page.fill("#opt-priority", "7")
    page.fill("#opt-queue", "reports")
    page.fill("#opt-retries", "2")
    page.click("#send")
    expect(page.locator("#results li")).to_have_count(2)  # the item, then its batch
    row = page.locator("#jobs tr", has_text="later")
    expect(row.locator("td[data-label=Queue]")).to_have_text("reports")
    expect(row.locator("td[data-label=Priority]")).to_have_text("7")
    expect(row.locator("td[data-label=Attempts]")).to_have_text("0")
    expect(row.locator("td[data-label=Starts]")).to_contain_text("at ")
    token = page.locator("#results code").nth(1).inner_text()
    _, view = server.request("GET", f"/check/{token}")
    assert (view["queue"], view["priority"], view["retries"], view["status"]) == (
        "reports", 7, 2, "queued")
    assert iso_seconds(view["run_at"]) - iso_seconds(view["created_at"]) == pytest.approx(
        3600, abs=0.01)
    page.fill("#opt-queue", "Not A Queue")
    page.click("#send")
    expect(page.locator("#results li .error")).to_contain_text("does not match")
    page.screenshot(path=str(tmp_path / "dashboard-options.png"), full_page=True)
    assert browser.problems == []


def test_dashboard_in_chromium_charts_activity_and_opens_details(servers, browser, tmp_path):
    from playwright.sync_api import expect
    server = servers("--db", str(tmp_path / "ui.sqlite3"), "--workers", "2")
    page = browser(server.url + "/")
    finished = page.locator("#line-finished")
    expect(page.locator("#line-queued")).not_to_have_attribute("points", "")
    page.click("summary")
    page.fill("#batch-json", json.dumps([{"item": f"chart-{n}", "valor": 0.4} for n in range(30)]
                                        + [{"item": "detail", "valor": 1, "retries": 2,
                                            "queue": "default", "priority": 3}]))
    page.click("#send")
    before = finished.get_attribute("points")
    expect(finished).not_to_have_attribute("points", before)  # it moves, second by second
    expect(page.locator("#rate-max")).not_to_have_text("0.0", timeout=15_000)  # jobs finished
    expect(page.locator("#depth-max")).not_to_have_text("0")  # and were queued meanwhile
    heights = page.evaluate("""document.getElementById("line-finished").getAttribute("points")
        .split(" ").map((point) => Number(point.split(",")[1]))""")
    assert min(heights) < 140  # a rate above zero is drawn above the axis
    page.screenshot(path=str(tmp_path / "dashboard-chart.png"), full_page=True)

    page.locator("#jobs tr", has_text="detail").locator("td.item").click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(page.locator("#detail-title")).to_contain_text("Job ")
    for name in ("attempts", "run_at", "queue", "priority", "retries", "batch", "created_at"):
        expect(detail.locator("dt", has_text=name).first).to_be_visible()
    expect(detail.locator("dd").nth(4)).not_to_be_empty()
    page.click("#show-batch")
    expect(page.locator("#detail-title")).to_contain_text("Batch ")
    expect(page.locator("#detail-jobs li")).to_have_count(31)
    expect(detail.locator("dd", has_text="done 31")).to_be_visible(timeout=20_000)
    page.locator("#detail-jobs li", has_text="chart-0").locator("button").click()
    expect(page.locator("#detail-title")).to_contain_text("Job ")
    page.click("#detail-close")
    expect(detail).to_be_hidden()

    outside = [url for url in page.requested if not url.startswith(server.url + "/")]
    assert outside == [], outside  # nothing external is ever loaded
    assert page.evaluate("window.violations") == []
    assert browser.problems == []


def test_dashboard_in_chromium_asks_for_the_key_and_leaks_nothing(servers, browser, tmp_path):
    from playwright.sync_api import expect
    server = servers("--db", str(tmp_path / "ui.sqlite3"), "--workers", "0",
                     "--api-key", "open sesame")
    status, _ = server.request("POST", "/api", [{"item": "secret-item", "valor": 1}],
                               {"Authorization": "Bearer open sesame"})
    assert status == 202
    page = browser(server.url + "/")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#jobs-note")).to_have_text("The API key is needed to list jobs.")
    expect(page.locator("#n-queued")).to_have_text("1")  # /health is open
    assert "secret-item" not in page.content()
    page.fill("#key", "open sesame")
    page.click("#key-form button")
    expect(page.locator("#jobs tr", has_text="secret-item")).to_have_count(1)
    expect(page.locator("#key-form")).to_be_hidden()
    # the browser's 401s before the key was given are expected; nothing else went wrong
    assert all("401" in problem for problem in browser.problems), browser.problems


PAGE_TASKS = """
def flaky(job):
    if job.item == "flaky" and job.attempts == 1:
        raise RuntimeError("the first try fails")
    job.canceled.wait(job.valor)
    return job.item
"""


def test_dashboard_in_chromium_shows_and_steers_fleet_queues_schedules_and_failures(
        servers, browser, tmp_path):
    from playwright.sync_api import expect
    (tmp_path / "pagetasks.py").write_text(PAGE_TASKS)
    server = servers("--db", str(tmp_path / "ui.sqlite3"), "--workers", "2",
                     "--api-key", "k3y", "--process", "pagetasks:flaky",
                     env={**os.environ, "PYTHONPATH": str(tmp_path)})
    keyed = {"Authorization": "Bearer k3y"}
    assert server.request("PUT", "/schedules/nightly", {"cron": "0 3 * * *", "job": {
        "item": "n", "valor": 0, "queue": "reports"}}, keyed)[0] == 201
    _, body = server.request("POST", "/api", [
        {"item": "flaky", "valor": 0}, {"item": "later", "valor": 0, "queue": "reports",
                                        "delay": 3600}], keyed)
    flaky = body["processing_items"][0]["hash"]
    wait_until(lambda: server.request("GET", f"/check/{flaky}")[1]["status"] == "failed")
    page = browser(server.url + "/")
    expect(page.locator("#fleet-note")).to_have_text("The API key is needed to see this.")
    page.fill("#key", "k3y")
    page.click("#key-form button")

    fleet = page.locator("#fleet tr")
    expect(fleet).to_have_count(1)
    expect(fleet.locator("td[data-label=Pid]")).to_have_text(str(server.process.pid))
    expect(fleet.locator("td[data-label=State]")).to_have_text("alive")
    expect(fleet.locator("td[data-label=Role]")).to_have_text("serves and works")
    expect(page.locator("#n-processes")).to_have_text("1")

    def pause_and_resume(row, path):
        for label, state, paused in (("Pause", "paused", True), ("Resume", "active", False)):
            row.locator("button", has_text=label).click()
            expect(row.locator("td[data-label=State]")).to_have_text(state)
            assert server.request("GET", path, headers=keyed)[1]["paused"] is paused

    reports = page.locator("#queues tr[data-queue=reports]")
    expect(reports.locator("td[data-label=Queued]")).to_have_text("1")
    pause_and_resume(reports, "/queues/reports")
    nightly = page.locator("#schedules tr[data-schedule=nightly]")
    expect(nightly.locator("td[data-label=Timing]")).to_have_text("cron 0 3 * * * (UTC)")
    expect(nightly.locator("td[data-label='Last job']")).to_have_text("none yet")
    pause_and_resume(nightly, "/schedules/nightly")
    expect(nightly.locator("td[data-label='Next run']")).not_to_have_text("paused")

    failed = page.locator(f"#failed tr[data-token='{flaky}']")
    expect(failed.locator("td[data-label=Error]")).to_have_text("the first try fails")
    page.screenshot(path=tmp_path / "dashboard-panels.png", full_page=True)
    failed.locator("button", has_text="Retry").click()
    expect(page.locator("#failed-note")).to_have_text("No failed job.")
    _, view = server.request("GET", f"/check/{flaky}?wait=10")
    assert (view["status"], view["attempts"]) == ("done", 2)  # it ran again, and passed

    outside = [url for url in page.requested if not url.startswith(server.url + "/")]
    assert outside == [], outside  # nothing external is ever loaded
    assert page.evaluate("window.violations") == []
    # the browser logs the 401s from before the key was given; nothing else went wrong
    assert all("401" in problem for problem in browser.problems), browser.problems


# -- Job options: delay, priority, queue, retries -------------------------------------

@both_stores
@pytest.mark.parametrize("options, error", [
    ({}, None),
    ({"delay": 0, "priority": -10, "queue": "a", "retries": 0}, None),
    ({"delay": 2.5, "priority": 10, "queue": "reports.v2_eu-1", "retries": 25}, None),
    ({"priority": 3.0, "retries": 2.0}, None),  # integers to JSON Schema
    ({"queue": "q" * 64}, None),
    ({"delay": 2592000}, None),  # max_delay, 30 days
    ({"delay": -1}, "-1 is less than the minimum of 0"),
    ({"delay": 2592001}, "2592001 is greater than the maximum of 2592000"),
    ({"delay": "soon"}, "'soon' is not of type 'number'"),
    ({"delay": True}, "True is not of type 'number'"),
    ({"priority": 11}, "11 is greater than the maximum of 10"),
    ({"priority": -11}, "-11 is less than the minimum of -10"),
    ({"priority": 1.5}, "1.5 is not of type 'integer'"),
    ({"priority": False}, "False is not of type 'integer'"),
    ({"queue": ""}, "'' does not match '^[a-z0-9][a-z0-9_.-]{0,63}$'"),
    ({"queue": "Reports"}, "'Reports' does not match '^[a-z0-9][a-z0-9_.-]{0,63}$'"),
    ({"queue": "a\n"}, "'a\\n' does not match '^[a-z0-9][a-z0-9_.-]{0,63}$'"),
    ({"queue": "_a"}, "'_a' does not match '^[a-z0-9][a-z0-9_.-]{0,63}$'"),
    ({"queue": "q" * 65}, f"'{'q' * 65}' does not match '^[a-z0-9][a-z0-9_.-]{{0,63}}$'"),
    ({"queue": 7}, "7 is not of type 'string'"),
    ({"retries": 26}, "26 is greater than the maximum of 25"),
    ({"retries": -1}, "-1 is less than the minimum of 0"),
    ({"retries": "2"}, "'2' is not of type 'integer'"),
    ({"unique": "k", "unique_for": 2592000, "expires": 2592000}, None),
    ({"unique": "x" * 255, "unique_for": 0.001, "expires": 0.001}, None),
    ({"unique": " ~printable ASCII~ "}, None),
    ({"unique": ""}, "'' does not match '^[\\\\x20-\\\\x7e]{1,255}$'"),
    ({"unique": "x" * 256}, f"'{'x' * 256}' does not match '^[\\\\x20-\\\\x7e]{{1,255}}$'"),
    ({"unique": "caf\u00e9"}, "'caf\u00e9' does not match '^[\\\\x20-\\\\x7e]{1,255}$'"),
    ({"unique": "tab\t"}, "'tab\\t' does not match '^[\\\\x20-\\\\x7e]{1,255}$'"),
    ({"unique": 5}, "5 is not of type 'string'"),
    ({"unique": "k", "unique_for": 0}, "0 is less than or equal to the minimum of 0"),
    ({"unique": "k", "unique_for": -1}, "-1 is less than or equal to the minimum of 0"),
    ({"unique": "k", "unique_for": 2592001}, "2592001 is greater than the maximum of 2592000"),
    ({"unique": "k", "unique_for": True}, "True is not of type 'number'"),
    ({"unique_for": 60}, "'unique' is a dependency of 'unique_for'"),
    ({"expires": 0}, "0 is less than or equal to the minimum of 0"),
    ({"expires": 2592001}, "2592001 is greater than the maximum of 2592000"),
    ({"expires": "1"}, "'1' is not of type 'number'"),
])
def test_job_options_are_checked_by_the_item_schema(make, options, error):
    built = make(workers=0)
    client = webtest.TestApp(built)
    entry = submit(client, [{"item": "a", "valor": 1, **options}]).json["processing_items"][0]
    if error is not None:
        assert (entry["hash"], entry["error"]) == ("INVALID_JOB_REQUEST", error)
        assert built.store.list()[0] == []
        return
    view = client.get(entry["check"], status=200).json
    assert (view["queue"], view["priority"], view["retries"]) == (
        options.get("queue", "default"), options.get("priority", 0), options.get("retries", 0))
    assert type(view["priority"]) is int and type(view["retries"]) is int
    waited = iso_seconds(view["run_at"]) - iso_seconds(view["created_at"])
    assert abs(waited - options.get("delay", 0)) < 0.002
    assert view.get("unique") == options.get("unique")
    if "expires" in options:  # the latest start: its first run_at plus expires
        left = iso_seconds(view["expires"]) - iso_seconds(view["run_at"])
        assert abs(left - options["expires"]) < 0.002
    else:
        assert "expires" not in view


def test_plain_items_answer_exactly_as_before_options(make):
    client = webtest.TestApp(make(workers=0))
    body = submit(client, ORIGINAL_BATCH).json
    assert body["processing_items"][0] == {
        "hash": "INVALID_JOB_REQUEST", "index": 0, "item": "Teste1",
        "error": "'valor' is a required property"}
    assert set(body["processing_items"][1]) == {"hash", "index", "item", "status", "check"}
    view = client.get(body["processing_items"][1]["check"], status=200).json
    assert view["run_at"] == view["created_at"] and view["queue"] == "default"


def test_retries_setting_is_the_default_of_an_item(make):
    client = webtest.TestApp(make(workers=0, retries=4))
    plain, own = submit(client, [{"item": "a", "valor": 1},
                                 {"item": "b", "valor": 1, "retries": 0}]).json["processing_items"]
    assert client.get(plain["check"]).json["retries"] == 4
    assert client.get(own["check"]).json["retries"] == 0


def test_max_delay_setting_moves_the_limit(make):
    client = webtest.TestApp(make(workers=0, max_delay=60))
    entry = submit(client, [{"item": "a", "valor": 1, "delay": 61}]).json["processing_items"][0]
    assert entry["error"] == "61 is greater than the maximum of 60"
    document = client.get("/openapi.json").json
    assert document["components"]["schemas"]["Item"]["properties"]["delay"]["maximum"] == 60


@store_suite
def test_store_claims_by_priority_then_run_at_then_age(store):
    a, b, c, d, e = hexes(*"abcde")
    store.submit([queue_tool.NewJob(a, "a", 0), queue_tool.NewJob(b, "b", 0, priority=5),
                  queue_tool.NewJob(c, "c", 0, priority=5),
                  queue_tool.NewJob(d, "d", 0, delay=3600, priority=10),
                  queue_tool.NewJob(e, "e", 0, priority=-1)], 0, 10)
    assert store.next_due(["x"]) is None and store.next_due() == 0
    order = [claim(store, "me:1:x", 60)["token"] for _ in range(4)]
    assert order == [b, c, a, e]  # d waits for its time whatever its priority
    assert claim(store, "me:1:x", 60) is None
    assert 3590 < store.next_due() <= 3600
    assert store.get(d)["status"] == "queued"


@store_suite
def test_store_claims_only_the_queues_asked_for(store):
    a, b = hexes("a", "b")
    store.submit([queue_tool.NewJob(b, "b", 0, queue="b"), queue_tool.NewJob(a, "a", 0, queue="a")],
                 0, 10)
    assert store.next_due(["c"]) is None and store.next_due(["a"]) == 0
    assert claim(store, "me:1:x", 60, ["c"]) is None
    assert claim(store, "me:1:x", 60, ["a"])["token"] == a
    assert claim(store, "me:1:x", 60, ["a", "b"])["token"] == b
    assert [job["token"] for job in store.list(queue="a")[0]] == [a]


@store_suite
def test_store_retry_requeues_for_later_and_counts(store):
    token = hexes("r")[0]
    store.submit([queue_tool.NewJob(token, "r", 0, retries=2)], 0, 10)
    claim(store, "me:1:x", 60)
    assert not store.retry(token, "other:1:x", 1, "boom", 60)
    assert store.retry(token, "me:1:x", 1, "boom", 60)
    row = store.get(token)
    assert (row["status"], row["error"], row["retried"], row["lease_until"]) == (
        "queued", "boom", 1, None)
    assert 55 < row["run_at"] - time.time() < 65
    assert claim(store, "me:1:x", 60) is None  # not before its time
    assert store.counters()["retried"] == 1 and store.counts()["queued"] == 1


@both_stores
def test_delayed_job_starts_at_its_time_not_before(make, db):
    client = webtest.TestApp(make(workers=1))
    entry = submit(client, [{"item": "later", "valor": 0, "delay": 0.6}]).json["processing_items"][0]
    early = client.get(entry["check"], status=200).json
    assert (early["status"], early["message"]) == ("queued", "Na fila")
    assert iso_seconds(early["run_at"]) > iso_seconds(early["created_at"]) + 0.59
    view = client.get(entry["check"] + "?wait=10", status=200).json
    started, due = iso_seconds(view["started_at"]), iso_seconds(view["run_at"])
    assert view["status"] == "done" and started >= due
    assert started - due < 0.5, "a delayed job waits for its time, not for a poll"


@both_stores
def test_higher_priority_submitted_later_runs_first(make, gate, seen, gated):
    client = webtest.TestApp(make(process=gated, workers=1))
    submit(client, [{"item": "blocker", "valor": 1}])
    started_jobs(seen, 1)  # the only worker is busy until the gate opens
    submit(client, [{"item": "low", "valor": 1}, {"item": "same", "valor": 1}])
    submit(client, [{"item": "high", "valor": 1, "priority": 5}])
    gate.set()
    started_jobs(seen, 4)
    assert [job.item for job in seen] == ["blocker", "high", "low", "same"]
    assert (seen[1].priority, seen[1].queue) == (5, "default")


def flaky(fails, starts):
    """A processor that raises `fails` times, recording when each attempt starts."""
    def process(job):
        starts.append(time.monotonic())
        if len(starts) <= fails:
            raise RuntimeError(f"boom {len(starts)}")
        return {"attempt": job.attempts}
    return process


@both_stores
def test_failing_job_is_retried_with_backoff_until_it_succeeds(make):
    starts = []
    built = make(process=flaky(2, starts), workers=1, retry_delay=0.2)
    client = webtest.TestApp(built)
    entry = submit(client, [{"item": "a", "valor": 0, "retries": 2}]).json["processing_items"][0]
    wait_until(lambda: client.get(entry["check"]).json["status"] == "done",
               what="the job to succeed on its third attempt")
    view = client.get(entry["check"], status=200).json
    assert (view["attempts"], view["result"], view["retries"]) == (3, {"attempt": 3}, 2)
    assert "error" not in view
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    for gap, expected in zip(gaps, (0.2, 0.4)):  # retry_delay x 2^(n-1), 10% jitter
        assert expected * 0.9 - 0.01 <= gap <= expected * 1.1 + 0.3, (gaps, expected)
    assert scrape(client)["queue_tool_jobs_retried_total"] == 2


@both_stores
def test_job_that_spends_its_retries_fails_with_the_last_error(make):
    starts = []
    client = webtest.TestApp(make(process=flaky(5, starts), workers=1, retry_delay=0.05))
    entry = submit(client, [{"item": "a", "valor": 0, "retries": 1}]).json["processing_items"][0]
    wait_until(lambda: client.get(entry["check"]).json["status"] == "failed")
    view = client.get(entry["check"], status=200).json
    assert (view["message"], view["error"], view["attempts"]) == ("Falhou", "boom 2", 2)


@both_stores
def test_retry_raised_by_the_processor_sets_the_wait(make):
    starts = []

    def process(job):
        starts.append(time.monotonic())
        if job.attempts == 1:
            raise queue_tool.Retry(delay=0.4)
        return "second time"
    client = webtest.TestApp(make(process=process, workers=1, retries=1, retry_delay=60))
    entry = submit(client, [{"item": "a", "valor": 0}]).json["processing_items"][0]
    wait_until(lambda: len(starts) == 1)
    waiting = client.get(entry["check"], status=200).json
    assert (waiting["status"], waiting["error"]) == ("queued", "the processor asked for a retry")
    view = client.get(entry["check"] + "?wait=10", status=200).json
    assert (view["status"], view["result"], view["attempts"]) == ("done", "second time", 2)
    assert 0.39 <= starts[1] - starts[0] <= 0.9  # its own delay, not retry_delay's minute


def test_retry_without_retries_left_fails_the_job(make):
    def process(job):
        raise queue_tool.Retry(delay=1, message="not yet")
    client = webtest.TestApp(make(process=process, workers=1))
    entry = submit(client, [{"item": "a", "valor": 0}]).json["processing_items"][0]
    view = client.get(entry["check"] + "?wait=10", status=200).json
    assert (view["status"], view["error"]) == ("failed", "not yet")


def test_retry_refuses_a_bad_delay():
    for delay in (-1, float("nan"), float("inf"), "soon"):
        with pytest.raises(ValueError, match="delay must be"):
            queue_tool.Retry(delay=delay)


@both_stores
def test_job_waiting_for_a_retry_can_be_canceled(make):
    starts = []
    client = webtest.TestApp(make(process=flaky(9, starts), workers=1, retry_delay=60))
    entry = submit(client, [{"item": "a", "valor": 0, "retries": 3}]).json["processing_items"][0]
    wait_until(lambda: client.get(entry["check"]).json.get("error") == "boom 1")
    view = client.delete(entry["check"], status=200).json
    assert (view["status"], view["error"], view["attempts"]) == ("canceled", "boom 1", 1)
    assert client.delete(entry["check"], status=409).json["error"] == "already_finished"


@both_stores
def test_shutdown_during_a_retry_wait_loses_nothing(make):
    starts = []
    first = make(process=flaky(1, starts), workers=1, retry_delay=0.5)
    client = webtest.TestApp(first)
    entry = submit(client, [{"item": "a", "valor": 0, "retries": 1}]).json["processing_items"][0]
    wait_until(lambda: client.get(entry["check"]).json.get("error") == "boom 1")
    assert first.close(grace=0) == []  # nothing running: nothing to put back
    second = make(process=flaky(0, []), workers=1)
    view = webtest.TestApp(second).get(entry["check"] + "?wait=10", status=200).json
    assert (view["status"], view["attempts"], view["result"]) == ("done", 2, {"attempt": 2})


@both_stores
def test_workers_take_only_the_queues_they_serve(make, gate):
    ran = []

    def record(job):
        ran.append((job.item, job.queue))
    serving_a = make(process=record, workers=1, queues="a")
    client = webtest.TestApp(serving_a)
    b_entry, a_entry = submit(client, [{"item": "for b", "valor": 0, "queue": "b"},
                                       {"item": "for a", "valor": 0, "queue": "a"}]
                              ).json["processing_items"]
    assert client.get(a_entry["check"] + "?wait=10").json["status"] == "done"
    serving_a.runner.notify_submitted(1)  # a nudge: it still must not take the b job
    assert client.get(b_entry["check"] + "?wait=0.3").json["status"] == "queued"
    make(process=record, workers=1, queues="b,c").start()
    assert client.get(b_entry["check"] + "?wait=10").json["status"] == "done"
    assert ran == [("for a", "a"), ("for b", "b")]
    page = client.get("/jobs?queue=b", status=200).json
    assert [job["item"] for job in page["jobs"]] == ["for b"]


@pytest.mark.parametrize("value", ["A", "a,,b", "a b", "-a"])
def test_bad_queues_setting_is_refused(tmp_path, value):
    with pytest.raises(queue_tool.SettingsError, match="queues must be"):
        queue_tool.make_app(db=tmp_path / "q.sqlite3", queues=value)


# The PostgreSQL schema of queue_tool's version 1, as its store created it.
SCHEMA_POSTGRES_1 = (
    """CREATE TABLE queue_tool_jobs (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, token text NOT NULL UNIQUE,
        item text NOT NULL, valor numeric NOT NULL, status text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(), started_at timestamptz,
        finished_at timestamptz, attempts integer NOT NULL DEFAULT 0, owner text,
        lease_until timestamptz, progress double precision, result text, error text)""",
    "CREATE INDEX queue_tool_jobs_queued ON queue_tool_jobs (id) WHERE status = 'queued'",
    "CREATE INDEX queue_tool_jobs_status_id ON queue_tool_jobs (status, id)",
    "CREATE INDEX queue_tool_jobs_running ON queue_tool_jobs (owner) WHERE status = 'running'",
    ("CREATE INDEX queue_tool_jobs_finished_at ON queue_tool_jobs (finished_at)"
     " WHERE finished_at IS NOT NULL"),
    """CREATE TABLE queue_tool_counters (name text NOT NULL, shard integer NOT NULL,
        value bigint NOT NULL, PRIMARY KEY (name, shard))""",
)


def test_postgres_database_of_version_1_is_upgraded_with_its_jobs(db_postgres, make):
    import psycopg
    with psycopg.connect(db_postgres, autocommit=True) as connection:
        for statement in SCHEMA_POSTGRES_1:
            connection.execute(statement)
        connection.execute("CREATE TABLE queue_tool_schema (version integer NOT NULL)")
        connection.execute("INSERT INTO queue_tool_schema VALUES (1)")
        connection.execute("INSERT INTO queue_tool_jobs (token, item, valor, status, created_at)"
                           " VALUES (%s, 'old', 1.5, 'queued', now() - interval '1 hour')",
                           ("a" * 32,))
        connection.execute("INSERT INTO queue_tool_counters VALUES ('submitted', 0, 1),"
                           " ('queued', 0, 1)")
    client = webtest.TestApp(make(db=db_postgres, workers=1))
    view = client.get("/check/" + "a" * 32 + "?wait=10", status=200).json
    assert (view["status"], view["valor"], view["queue"], view["priority"]) == (
        "done", 1.5, "default", 0)
    assert view["run_at"] == view["created_at"]
    assert scrape(client)["queue_tool_jobs_submitted_total"] == 1
    assert sql(db_postgres, "SELECT version FROM queue_tool_schema") == [
        (queue_tool.PostgresStore.VERSION,)]


@both_stores
def test_batch_mixing_ints_floats_and_absent_options_is_stored_as_given(make):
    """psycopg types a list by its items: a batch with `delay` 1.5 beside 2 (or beside
    none) once answered 503, and clients retried a good request for ever."""
    client = webtest.TestApp(make(workers=0))
    batch = [{"item": "a", "valor": 1, "delay": 1.5, "priority": 1, "retries": 2},
             {"item": "b", "valor": 0.5},
             {"item": "c", "valor": 2, "delay": 2, "priority": 2.0, "retries": 1.0},
             {"item": "d", "valor": 0, "delay": 0.5, "priority": -3, "retries": 0},
             {"item": "e", "valor": 3.25, "delay": 0}]
    entries = submit(client, batch).json["processing_items"]
    assert [entry.get("status") for entry in entries] == ["queued"] * len(batch)
    for entry, item in zip(entries, batch, strict=True):
        view = client.get(entry["check"], status=200).json
        assert (view["valor"], type(view["valor"])) == (item["valor"], type(item["valor"]))
        assert (view["priority"], view["retries"]) == (item.get("priority", 0),
                                                       item.get("retries", 0))
        delay = iso_seconds(view["run_at"]) - iso_seconds(view["created_at"])
        assert abs(delay - item.get("delay", 0)) < 0.002, (item, view)


# -- Idempotent submits and batches ----------------------------------------------------

def jobs_stored(db):
    return sql(db, "SELECT COUNT(*) FROM {jobs}")[0][0]


@both_stores
def test_replayed_key_gets_the_first_answer_and_queues_nothing(make, db):
    client = webtest.TestApp(make(workers=0))
    key = {"Idempotency-Key": "order-42"}
    first = submit(client, ORIGINAL_BATCH + [{"item": "b", "valor": 2}], headers=key)
    assert "Idempotent-Replayed" not in first.headers
    assert re.fullmatch(r"[0-9a-f]{32}", first.json["batch"])
    assert first.json["check_batch"] == "/batch/" + first.json["batch"]
    again = client.post("/api", json.dumps(ORIGINAL_BATCH + [{"item": "b", "valor": 2}],
                                           indent=2),  # the same JSON, spelled otherwise
                        content_type="application/json", headers=key, status=202)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.body == first.body
    assert jobs_stored(db) == 2
    assert scrape(client)["queue_tool_jobs_submitted_total"] == 2


@both_stores
def test_same_key_with_another_body_is_422_and_queues_nothing(make, db):
    client = webtest.TestApp(make(workers=0))
    submit(client, [{"item": "a", "valor": 1}], headers={"Idempotency-Key": "k"})
    refused = submit(client, [{"item": "a", "valor": 2}], status=422,
                     headers={"Idempotency-Key": "k"})
    assert refused.json == {"message": "this Idempotency-Key came with another body",
                            "error": "idempotency_key_reused"}
    assert jobs_stored(db) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\xe9", "tab\there"])
def test_bad_idempotency_key_is_400(app, key):
    status, _, body = call(app, "POST", "/api", b'[{"item": "a", "valor": 1}]',
                           CONTENT_TYPE="application/json", CONTENT_LENGTH="27",
                           HTTP_IDEMPOTENCY_KEY=key)
    assert (status, body["error"]) == (400, "invalid_idempotency_key")
    assert app.store.list()[0] == []


def test_longest_idempotency_key_is_accepted(client):
    key = "".join(chr(32 + n % 95) for n in range(255))
    submit(client, [{"item": "a", "valor": 1}], headers={"Idempotency-Key": key})


@both_stores
def test_key_of_a_refused_request_can_be_used_again(make, db):
    built = make(workers=0, max_queued=1)
    client = webtest.TestApp(built)
    (blocker,) = tokens_of(submit(client, [{"item": "first", "valor": 1}]))
    key = {"Idempotency-Key": "after-full"}
    full = submit(client, [{"item": "a", "valor": 1}], status=503, headers=key)
    assert full.json["error"] == "queue_full"
    client.delete(f"/check/{blocker}", status=200)  # room again
    accepted = submit(client, [{"item": "a", "valor": 1}], headers=key)
    assert "Idempotent-Replayed" not in accepted.headers
    replayed = submit(client, [{"item": "a", "valor": 1}], headers=key)
    assert replayed.headers["Idempotent-Replayed"] == "true" and replayed.body == accepted.body
    assert jobs_stored(db) == 2


@both_stores
def test_concurrent_requests_with_one_key_on_two_servers_queue_once(servers, db):
    front = [servers("--db", str(db), "--workers", "0", name=f"front{n}") for n in range(2)]
    batch = [{"item": f"i{n}", "valor": 1} for n in range(5)]
    answers, go = [], threading.Event()

    def post(server):
        go.wait(10)
        request = urllib.request.Request(
            server.url + "/api", data=json.dumps(batch).encode(), method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": "once"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append((response.status, response.headers.get("Idempotent-Replayed"),
                            response.read()))
    threads = [threading.Thread(target=post, args=(front[n % 2],)) for n in range(20)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 20 and {status for status, _, _ in answers} == {202}
    assert len({body for _, _, body in answers}) == 1  # one batch, the same tokens for all
    assert sum(replayed is None for _, replayed, _ in answers) == 1
    assert jobs_stored(db) == 5
    assert sql(db, "SELECT COUNT(*) FROM {batches}")[0][0] == 1
    for server in front:
        assert server.stop() == 0


@both_stores
def test_batch_counts_move_as_its_jobs_finish(make, gate, seen, gated):
    client = webtest.TestApp(make(process=gated, workers=2))
    accepted = submit(client, [{"item": "one", "valor": 1}, {"item": "bad"},
                               {"item": "two", "valor": 1}, {"item": "three", "valor": 1}]).json
    started_jobs(seen, 2)
    view = client.get(accepted["check_batch"], status=200)
    assert view.headers["Retry-After"] == "1"
    view = view.json
    assert (view["batch"], view["total"], view["finished"]) == (accepted["batch"], 3, False)
    assert view["counts"] == {"queued": 1, "running": 2, "done": 0, "failed": 0,
                              "canceled": 0}
    assert [job["item"] for job in view["jobs"]] == ["one", "two", "three"]  # input order
    assert view["created_at"] == view["jobs"][0]["created_at"]
    gate.set()
    final = client.get(accepted["check_batch"] + "?wait=10", status=200)
    assert "Retry-After" not in final.headers
    assert final.json["finished"] and final.json["counts"]["done"] == 3


@both_stores
def test_batch_of_only_invalid_items_is_finished_and_empty(make):
    client = webtest.TestApp(make(workers=0))
    accepted = submit(client, [{"item": "bad"}]).json
    view = client.get(accepted["check_batch"] + "?wait=5", status=200).json
    assert (view["total"], view["jobs"], view["finished"]) == (0, [], True)


@both_stores
def test_delete_batch_cancels_only_its_unfinished_jobs(make, gate, seen):
    def process(job):
        seen.append(job)
        if job.item != "quick":
            job.canceled.wait(30)
    built = make(process=process, workers=1)
    client = webtest.TestApp(built)
    quick = submit(client, [{"item": "quick", "valor": 0}]).json["processing_items"][0]
    client.get(quick["check"] + "?wait=5", status=200)
    accepted = submit(client, [{"item": "slow", "valor": 9}, {"item": "waiting", "valor": 9}]).json
    other = submit(client, [{"item": "elsewhere", "valor": 9}]).json
    started_jobs(seen, 2)
    view = client.delete(accepted["check_batch"], status=200).json
    assert view["counts"] == {"queued": 0, "running": 0, "done": 0, "failed": 0, "canceled": 2}
    assert view["finished"] and seen[1].canceled.is_set()
    assert client.get(other["check_batch"]).json["counts"]["canceled"] == 0
    again = client.delete(accepted["check_batch"], status=200).json  # nothing left to cancel
    assert again["counts"]["canceled"] == 2
    assert scrape(client)['queue_tool_jobs_finished_total{status="canceled"}'] == 2


@pytest.mark.parametrize("method, path", [
    ("GET", f"/batch/{UNKNOWN_TOKEN}"), ("DELETE", f"/batch/{UNKNOWN_TOKEN}"),
    ("GET", "/batch/xyz"), ("GET", "/batch/"), ("DELETE", "/batch/" + "A" * 32)])
def test_unknown_batch_is_404(client, method, path):
    response = client.request(path, method=method, status=404)
    assert response.json["error"] == "not_found"


def test_batch_is_open_to_read_and_needs_the_key_to_cancel(keyed):
    key = {"Authorization": "Bearer s3cret-key"}
    accepted = submit(keyed, [{"item": "a", "valor": 1}], headers=key).json
    keyed.get(accepted["check_batch"], status=200)
    keyed.delete(accepted["check_batch"], status=401)
    keyed.delete(accepted["check_batch"], status=200, headers=key)


@both_stores
def test_old_batches_and_their_keys_are_purged_with_their_jobs(make, db):
    built = make(workers=1, retention=0.3)
    client = webtest.TestApp(built)
    key = {"Idempotency-Key": "short-lived"}
    accepted = submit(client, [{"item": "a", "valor": 0}], headers=key).json
    client.get(accepted["check_batch"] + "?wait=5", status=200)
    wait_until(lambda: client.get(accepted["check_batch"], expect_errors=True).status_int == 404,
               what="the batch to be purged with its job")
    again = submit(client, [{"item": "a", "valor": 0}], headers=key)
    assert "Idempotent-Replayed" not in again.headers  # the key expired with its batch


# -- Processors ------------------------------------------------------------------

@both_stores
def test_processor_that_raises_fails_the_job_with_its_message(make):
    def explode(job):
        raise ValueError(f"cannot handle {job.item}")
    client = webtest.TestApp(make(process=explode, workers=1))
    token = tokens_of(submit(client, [{"item": "bad", "valor": 1}]))[0]
    view = client.get(f"/check/{token}?wait=5", status=200).json
    assert (view["status"], view["message"]) == ("failed", "Falhou")
    assert view["error"] == "cannot handle bad"
    assert "Traceback" not in json.dumps(view)


def test_exception_without_message_is_named_by_its_class(make):
    def explode(job):
        raise KeyError
    client = webtest.TestApp(make(process=explode, workers=1))
    token = tokens_of(submit(client, [{"item": "bad", "valor": 1}]))[0]
    assert client.get(f"/check/{token}?wait=5", status=200).json["error"] == "KeyError"


def test_processor_receives_the_job_spec_describes(client, seen):
    token = tokens_of(submit(client, [{"item": "Teste2", "valor": 2.5}]))[0]
    (job,) = started_jobs(seen, 1)
    assert (job.token, job.item, job.valor, job.attempts) == (token, "Teste2", 2.5, 1)
    assert isinstance(job.canceled, threading.Event) and not job.canceled.is_set()


@pytest.mark.parametrize("value, shown", [
    ({"n": 1, "list": [1, "a", None]}, {"n": 1, "list": [1, "a", None]}),
    ("text", "text"), (0, 0), (False, False), ([], []),
])
def test_json_return_value_becomes_the_result(make, value, shown):
    client = webtest.TestApp(make(process=lambda job: value, workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
    assert client.get(f"/check/{token}?wait=5", status=200).json["result"] == shown


@pytest.mark.parametrize("value", [None, {1, 2}, object(), float("nan")])
def test_none_or_non_json_return_value_leaves_no_result(make, value):
    client = webtest.TestApp(make(process=lambda job: value, workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
    view = client.get(f"/check/{token}?wait=5", status=200).json
    assert view["status"] == "done" and "result" not in view


@both_stores
def test_reported_progress_is_shown_while_running(make, gate):
    reported = threading.Event()

    def halfway(job):
        job.set_progress(0.5)
        reported.set()
        gate.wait(10)
    client = webtest.TestApp(make(process=halfway, workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 100}]))[0]
    assert reported.wait(10)
    assert client.get(f"/check/{token}", status=200).json["progress"] == 0.5
    gate.set()
    assert "progress" not in client.get(f"/check/{token}?wait=5", status=200).json


@both_stores
def test_default_processor_waits_valor_seconds(make):
    client = webtest.TestApp(make(workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 0.3}]))[0]
    view = client.get(f"/check/{token}?wait=10", status=200).json
    assert view["status"] == "done"
    started = datetime.datetime.fromisoformat(view["started_at"])
    finished = datetime.datetime.fromisoformat(view["finished_at"])
    assert (finished - started).total_seconds() >= 0.29


def test_default_processor_shows_elapsed_progress(make):
    client = webtest.TestApp(make(workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 60}]))[0]
    wait_until(lambda: client.get(f"/check/{token}").json["status"] == "running")
    first = client.get(f"/check/{token}", status=200).json["progress"]
    wait_until(lambda: client.get(f"/check/{token}").json["progress"] > first)
    assert 0 <= first < 0.5


# -- Workers ---------------------------------------------------------------------

def test_embedded_app_starts_workers_on_first_request(make):
    built = make(workers=3)
    assert built.runner.alive_workers() == 0
    webtest.TestApp(built).get("/health", status=200)
    assert built.runner.alive_workers() == 3


def test_start_starts_workers_without_a_request(make):
    built = make(workers=2)
    built.start()
    built.start()  # idempotent
    assert built.runner.alive_workers() == 2


@both_stores
def test_submit_wakes_an_idle_worker_at_once(make):
    built = make(workers=1)
    built.runner.poll_interval = 600  # only a wake-up can start the job in time
    client = webtest.TestApp(built)
    client.get("/health", status=200)
    wait_until(lambda: built.runner.alive_workers() == 1)
    token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
    assert client.get(f"/check/{token}?wait=10", status=200).json["status"] == "done"


@both_stores
def test_workers_take_the_oldest_job_first(make, gate, seen, gated):
    client = webtest.TestApp(make(process=gated, workers=0))
    tokens = tokens_of(submit(client, [{"item": f"j{n}", "valor": 1} for n in range(5)]))
    worker = make(process=gated, workers=1)
    worker.start()
    gate.set()
    wait_until(lambda: len(seen) == 5)
    assert [job.token for job in seen] == tokens


@both_stores
def test_workers_share_commits_and_run_each_job_once(make):
    ran = collections.Counter()

    def process(job):
        ran[job.token] += 1
    built = make(process=process, workers=8)
    commits = []
    original = built.store.finish_and_claim

    def counting(owner, finishes, claims, lease, queues=None, limits=None):
        commits.append((len(finishes), claims))
        return original(owner, finishes, claims, lease, queues, limits)
    built.store.finish_and_claim = counting
    client = webtest.TestApp(built)
    tokens = []
    for start in range(0, 300, 100):
        tokens += tokens_of(submit(client, [{"item": f"{n}", "valor": 0}
                                            for n in range(start, start + 100)]))
    for token in tokens:
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    assert sorted(ran) == sorted(tokens) and set(ran.values()) == {1}
    # One commit records a job's end and claims the next one: never two per job, as
    # a claim and a finish each of their own were.
    assert sum(finishes for finishes, _ in commits) == 300
    assert len(commits) < 2 * 300
    print("commits:", len(commits), "largest:", max(finishes for finishes, _ in commits))


def test_sqlite_fsyncs_submits_but_not_the_workers_claims_and_ends(make, tmp_path):
    built = make(db=tmp_path / "sync.sqlite3", workers=4)
    statements = []
    with built.store._lock:
        built.store._connection().set_trace_callback(statements.append)
    client = webtest.TestApp(built)
    for _ in range(5):
        (token,) = tokens_of(submit(client, [{"item": "a", "valor": 0}]))
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    built.close(grace=5)
    mode, seen = "FULL", collections.defaultdict(set)  # each connection starts FULL
    for statement in statements:
        if statement.startswith("PRAGMA synchronous="):
            mode = statement.split("=")[1]
        elif statement.startswith("INSERT INTO jobs"):
            seen["submit"].add(mode)
        elif statement.startswith("UPDATE jobs SET status = 'running'"):
            seen["claim"].add(mode)
        elif statement.startswith("UPDATE jobs SET status = '") and "finished_at" in statement:
            seen["end"].add(mode)
    # A 202 waits for the disk; a claim or an end lost to a power cut only runs a job again.
    assert seen == {"submit": {"FULL"}, "claim": {"NORMAL"}, "end": {"NORMAL"}}


def submits_held_behind_the_writer(built, bodies):
    """POST each body from a thread of its own while the store's writer is held, so
    they all wait together; then let go: [(status, body)] in order, and the store's
    statements meanwhile."""
    store, statements, answers = built.store, [], [None] * len(bodies)
    built.start()  # its own first writes (its record in the fleet) before the test's
    with store._lock:
        store._connection().set_trace_callback(statements.append)

    def post(n):
        body = json.dumps(bodies[n]).encode()
        status, _, body = call(built, "POST", "/api", body, CONTENT_TYPE="application/json",
                               CONTENT_LENGTH=str(len(body)))
        answers[n] = (status, body)
    threads = [threading.Thread(target=post, args=(n,)) for n in range(len(bodies))]
    with store._lock:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(store._group._pending) == len(bodies), what="every submit waiting")
    for thread in threads:
        thread.join(10)
    return answers, statements


def test_sqlite_submits_that_wait_together_share_one_commit(make, tmp_path):
    built = make(db=tmp_path / "group.sqlite3", workers=0, max_queued=12)
    bodies = [[{"item": f"a{n}", "valor": 0}] for n in range(10)]
    bodies[3] = [{"item": "too many", "valor": 0}] * 13  # past max_queued: refused alone
    bodies[6] = [{"item": "u", "valor": 0, "unique": "k"}]
    bodies[7] = [{"item": "u", "valor": 0, "unique": "k"}]  # one of the two holds the key
    answers, statements = submits_held_behind_the_writer(built, bodies)
    assert [status for status, _ in answers] == [202] * 3 + [503] + [202] * 6
    assert answers[3][1]["error"] == "queue_full"
    pair = sorted((answers[n][1]["processing_items"][0] for n in (6, 7)),
                  key=lambda entry: "duplicate" in entry)
    assert pair[1]["duplicate"] is True and pair[1]["hash"] == pair[0]["hash"]
    transactions = " ".join(statements).split("BEGIN IMMEDIATE")
    assert sum("INSERT INTO jobs" in t for t in transactions) == 1  # one commit, one fsync
    items = sorted(item for (item,) in sql(tmp_path / "group.sqlite3", "SELECT item FROM {jobs}"))
    assert items == sorted([f"a{n}" for n in range(10) if n not in (3, 6, 7)] + ["u"])
    assert built.store.counters()["submitted"] == 8


def test_postgres_submits_that_wait_together_share_one_transaction(make, db_postgres):
    """Plain submits group-commit on PostgreSQL too; a submit with unique keys keeps
    a transaction of its own (its keys' locks)."""
    built = make(db=db_postgres, workers=0, max_queued=12)
    built.start()
    bodies = [[{"item": f"a{n}", "valor": 0}] for n in range(8)]
    bodies[3] = [{"item": "too many", "valor": 0}] * 13  # past max_queued: refused alone
    bodies[5] = [{"item": "u", "valor": 0, "unique": "k"}]
    answers = [None] * len(bodies)

    def post(n):
        body = json.dumps(bodies[n]).encode()
        status, _, body = call(built, "POST", "/api", body, CONTENT_TYPE="application/json",
                               CONTENT_LENGTH=str(len(body)))
        answers[n] = (status, body)
    pool = built.store._pool_here()
    held = [pool.getconn() for _ in range(built.store.pool_size)]  # no transaction can start
    threads = [threading.Thread(target=post, args=(n,)) for n in range(len(bodies))]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(built.store._group._pending) == len(bodies) - 1,
                   what="every plain submit waiting")
    finally:
        for conn in held:
            pool.putconn(conn)
    for thread in threads:
        thread.join(10)
    assert [status for status, _ in answers] == [202] * 3 + [503] + [202] * 4
    assert answers[3][1]["error"] == "queue_full"
    rows = sql(db_postgres, "SELECT item, created_at FROM {jobs}")
    assert sorted(item for item, _ in rows) == sorted(
        [f"a{n}" for n in range(8) if n not in (3, 5)] + ["u"])
    # One transaction holds the six plain ones (now() is its start, to the
    # microsecond); the keyed one has its own.
    assert len({created for item, created in rows if item != "u"}) == 1
    assert built.store.counters()["submitted"] == 7


def test_sqlite_a_failed_group_commit_fails_each_submit_and_queues_none(make, tmp_path):
    built = make(db=tmp_path / "group.sqlite3", workers=0)
    store, original = built.store, built.store._submit

    def failing(conn, jobs, *args):
        if jobs[0].item == "poison":
            raise sqlite3.OperationalError("disk I/O error")
        return original(conn, jobs, *args)
    store._submit = failing
    answers, _ = submits_held_behind_the_writer(built, [
        [{"item": "a", "valor": 0}], [{"item": "poison", "valor": 0}], [{"item": "b", "valor": 0}]])
    assert [(status, body["error"]) for status, body in answers] == [
        (503, "store_unavailable")] * 3
    assert sql(tmp_path / "group.sqlite3", "SELECT COUNT(*) FROM {jobs}") == [(0,)]
    store._submit = original
    assert submit(webtest.TestApp(built), [{"item": "c", "valor": 0}]).status_int == 202


@both_stores
def test_event_map_holds_only_live_jobs(make, gated, seen, gate):
    built = make(process=gated, workers=2)
    client = webtest.TestApp(built)
    tokens = tokens_of(submit(client, [{"item": f"j{n}", "valor": 1} for n in range(30)]))
    started_jobs(seen, 2)
    assert sorted(built.runner._live) == sorted(job.token for job in seen[:2])
    gate.set()
    for token in tokens:
        client.get(f"/check/{token}?wait=10", status=200)
    wait_until(lambda: not built.runner._live, what="the map to empty")


@both_stores
def test_jobs_run_in_parallel_up_to_workers(make, gated, seen):
    client = webtest.TestApp(make(process=gated, workers=3))
    submit(client, [{"item": f"j{n}", "valor": 1} for n in range(5)])
    started_jobs(seen, 3)
    assert client.get("/health", status=200).json["running"] == 3
    assert client.get("/health", status=200).json["queued"] == 2


# -- Routing and errors ------------------------------------------------------------

@pytest.mark.parametrize("method, path, status, error, allow", [
    ("GET", "/nope", 404, "not_found", None),
    ("GET", "/api/", 404, "not_found", None),
    ("GET", "/API", 404, "not_found", None),
    ("GET", "/api", 405, "method_not_allowed", "POST"),
    ("PUT", "/api", 405, "method_not_allowed", "POST"),
    ("DELETE", "/api", 405, "method_not_allowed", "POST"),
    ("POST", f"/check/{UNKNOWN_TOKEN}", 405, "method_not_allowed", "GET, DELETE, HEAD"),
    ("POST", "/health", 405, "method_not_allowed", "GET, HEAD"),
    ("PATCH", "/jobs", 405, "method_not_allowed", "GET, HEAD"),
])
def test_routing_errors(client, method, path, status, error, allow):
    response = client.request(path, method=method, status=status)
    assert response.json["error"] == error and response.json["message"]
    assert response.headers.get("Allow") == allow


def test_head_answers_headers_only(client):
    response = client.head("/health", status=200)
    assert response.body == b"" and int(response.headers["Content-Length"]) > 0


def test_every_response_says_nosniff(client):
    for response in (client.get("/health"), client.get("/nope", status=404)):
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_unexpected_error_is_a_500_without_traceback(make, caplog):
    built = make(workers=0)

    def broken(*args):
        raise RuntimeError("secret detail")
    built.store.counts = broken
    response = webtest.TestApp(built).get("/health", status=500)
    assert response.json == {"message": "the server failed; see its log",
                             "error": "internal_error"}
    assert "RuntimeError: secret detail" in caplog.text


def test_debug_puts_the_traceback_in_the_500(make):
    built = make(workers=0, debug=True)

    def broken(*args):
        raise RuntimeError("secret detail")
    built.store.counts = broken
    response = webtest.TestApp(built).get("/health", status=500)
    assert "Traceback" in response.json["traceback"]


# -- Durability ------------------------------------------------------------------------

@both_stores
def test_accepted_jobs_are_readable_by_another_app_on_the_same_db(make, tmp_path):
    first = webtest.TestApp(make(workers=0))
    tokens = tokens_of(submit(first, [{"item": f"j{n}", "valor": 1} for n in range(3)]))
    second = webtest.TestApp(make(workers=0))
    for token in tokens:
        assert second.get(f"/check/{token}", status=200).json["message"] == "Na fila"


@both_stores
def test_accepted_jobs_survive_closing_the_app(make, tmp_path):
    first = make(workers=0)
    tokens = tokens_of(submit(webtest.TestApp(first), [{"item": "a", "valor": 0}]))
    first.close()
    second = make(workers=1)
    view = webtest.TestApp(second).get(f"/check/{tokens[0]}?wait=10", status=200).json
    assert view["status"] == "done" and view["item"] == "a"


def test_memory_db_keeps_jobs_for_the_life_of_the_app(make):
    client = webtest.TestApp(make(db=":memory:", workers=1))
    token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
    assert client.get(f"/check/{token}?wait=5", status=200).json["status"] == "done"


# -- Stores: one suite, run on both ----------------------------------------------------

@pytest.fixture
def store(request, db):
    callspec = getattr(request.node, "callspec", None)
    pooled = callspec is not None and callspec.params.get("db") == "pgbouncer"
    opened = queue_tool.open_store(db, pooler="transaction" if pooled else "none")
    yield opened
    opened.close()


def hexes(*names):
    return [(name * 32)[:32] for name in names]


def claim(store, owner, lease, queues=None):
    """One job claimed for `owner` as a worker claims it, or None."""
    claimed = store.finish_and_claim(owner, (), 1, lease, queues)[1]
    return claimed[0] if claimed else None


def finish(store, token, owner, status, result=None, error=None):
    """End `owner`'s run of the job as a worker ends it: whether it was recorded."""
    row = store.get(token)
    ends = [(token, row["attempts"], status, result, error)]
    return token in store.finish_and_claim(owner, ends, 0, 0)[0]


@store_suite
def test_store_submit_keeps_each_job_as_given(store):
    a, b, c = hexes("a", "b", "c")
    before = time.time()
    store.submit([(a, "one", 10), (b, "two", 1.5), (c, "three", 10.0)], 2, 100)
    assert store.get(a)["valor"] == 10 and type(store.get(a)["valor"]) is int
    assert (store.get(b)["valor"], store.get(c)["valor"]) == (1.5, 10.0)
    assert type(store.get(c)["valor"]) is float  # 10.0 stays 10.0, as JSON has it
    row = store.get(b)
    assert (row["item"], row["status"], row["attempts"], row["owner"]) == (
        "two", "queued", 0, None)
    assert before - 5 < row["created_at"] < time.time() + 5
    assert store.get(UNKNOWN_TOKEN) is None
    assert store.counts()["queued"] == 3 and store.counts() == {"queued": 3, "running": 0}
    assert store.counters() == {"submitted": 3, "invalid": 2, "finished_done": 0,
                                "finished_failed": 0, "finished_canceled": 0, "retried": 0,
                                "queued": 3, "duplicate": 0}


@store_suite
def test_store_submit_past_max_queued_stores_nothing(store):
    store.submit([(hexes("a")[0], "a", 0)], 0, 2)
    with pytest.raises(queue_tool.QueueFull):
        store.submit([(token, "x", 0) for token in hexes("b", "c")], 5, 2)
    assert [job["item"] for job in store.list()[0]] == ["a"]
    assert store.counters()["invalid"] == 0 and store.counts()["queued"] == 1


@store_suite
def test_store_claims_oldest_first_with_a_lease(store):
    tokens = hexes(*"edcba")
    store.submit([(token, token[0], 0) for token in tokens], 0, 100)
    claimed = [claim(store, "me:1:x", 60) for _ in tokens]
    assert [row["token"] for row in claimed] == tokens
    assert claim(store, "me:1:x", 60) is None
    row = claimed[0]
    assert (row["status"], row["owner"], row["attempts"]) == ("running", "me:1:x", 1)
    assert 50 < row["lease_until"] - row["started_at"] < 70
    assert store.counts() == {"queued": 0, "running": 5}
    assert store.running_owners() == ["me:1:x"]


@both_stores
def test_store_claims_each_job_once_under_concurrent_claimers(db):
    stores = [queue_tool.open_store(db) for _ in range(3)]  # as if three processes
    tokens = [f"{n:032x}" for n in range(300)]
    stores[0].submit([(token, "x", 0) for token in tokens], 0, 1000)
    taken = collections.Counter()

    def claim_all(claimer, owner):
        while (row := claim(claimer, owner, 60)) is not None:
            taken[row["token"]] += 1
    threads = [threading.Thread(target=claim_all, args=(stores[n % 3], f"o:{n}:x"))
               for n in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == tokens and set(taken.values()) == {1}
    assert stores[0].counts() == {"queued": 0, "running": 300}
    for opened in stores:
        opened.close()


@both_stores
def test_store_claims_of_many_at_once_take_no_more_than_asked(db):
    stores = [queue_tool.open_store(db) for _ in range(3)]
    stores[0].submit([(f"{n:032x}", "x", 0) for n in range(600)], 0, 1000)
    returned = collections.Counter()

    def claim_all(claimer, owner):
        while claimed := claimer.finish_and_claim(owner, (), 8, 60)[1]:
            assert len(claimed) <= 8
            returned[owner] += len(claimed)
    threads = [threading.Thread(target=claim_all, args=(stores[n % 3], f"o:{n}:x"))
               for n in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    held = collections.Counter(dict(sql(db, "SELECT owner, COUNT(*) FROM {jobs} GROUP BY owner")))
    assert held == returned and sum(held.values()) == 600  # every claimed row was handed out
    for opened in stores:
        opened.close()


@store_suite
def test_store_finish_is_for_the_owner_of_a_running_job(store):
    done, failed = hexes("d", "f")
    store.submit([(done, "d", 0), (failed, "f", 0)], 0, 10)
    claim(store, "me:1:x", 60)
    claim(store, "me:1:x", 60)
    assert not finish(store, done, "someone:2:y", "done")
    assert finish(store, done, "me:1:x", "done", result='{"n":1}')
    assert not finish(store, done, "me:1:x", "failed")  # already final
    assert finish(store, failed, "me:1:x", "failed", error="boom")
    row = store.get(done)
    assert (row["status"], row["result"], row["owner"], row["lease_until"]) == (
        "done", '{"n":1}', "me:1:x", None)  # the owner stays: the process that ran it
    assert row["finished_at"] >= row["started_at"]
    assert (store.get(failed)["status"], store.get(failed)["error"]) == ("failed", "boom")
    counters = store.counters()
    assert (counters["finished_done"], counters["finished_failed"]) == (1, 1)


@store_suite
def test_store_progress_is_set_only_by_the_owner(store):
    token = hexes("p")[0]
    store.submit([(token, "p", 1)], 0, 10)
    claim(store, "me:1:x", 60)
    store.set_progress(token, "other:1:x", 1, 0.9)
    assert store.get(token)["progress"] is None
    store.set_progress(token, "me:1:x", 1, 0.25)
    assert store.get(token)["progress"] == 0.25


@store_suite
def test_store_cancel_ends_queued_and_running_jobs_once(store):
    queued, running = hexes("q", "r")
    store.submit([(running, "r", 1), (queued, "q", 1)], 0, 10)
    claim(store, "me:1:x", 60)
    before, after = store.cancel(running)
    assert (before["status"], after["status"], after["lease_until"]) == (
        "running", "canceled", None)
    before, after = store.cancel(queued)
    assert (before["status"], after["status"]) == ("queued", "canceled")
    assert after["finished_at"] is not None
    again = store.cancel(queued)
    assert again[0] == again[1] and again[0]["status"] == "canceled"
    assert store.cancel(UNKNOWN_TOKEN) is None
    assert store.counters()["finished_canceled"] == 2
    assert store.counts() == {"queued": 0, "running": 0}
    assert not finish(store, running, "me:1:x", "done")  # the cancel decided it


@store_suite
def test_store_renew_extends_the_leases_still_held(store):
    kept, canceled = hexes("k", "c")
    store.submit([(kept, "k", 1), (canceled, "c", 1)], 0, 10)
    first = claim(store, "me:1:x", 1)
    claim(store, "me:1:x", 1)
    store.cancel(canceled)
    assert store.renew("me:1:x", {kept: 1, canceled: 1}, 600) == {kept}
    assert store.get(kept)["lease_until"] > first["lease_until"] + 500
    assert store.renew("other:1:x", {kept: 1}, 600) == set()


@store_suite
def test_store_release_puts_an_owners_jobs_back(store):
    mine, theirs = hexes("m", "t")
    store.submit([(mine, "m", 1), (theirs, "t", 1)], 0, 10)
    claim(store, "me:1:x", 60)
    claim(store, "them:1:x", 60)
    assert store.release("me:1:x") == [mine]
    row = store.get(mine)
    assert (row["status"], row["lease_until"], row["attempts"]) == ("queued", None, 1)
    assert store.get(theirs)["status"] == "running"
    assert store.counts() == {"queued": 1, "running": 1}


@store_suite
def test_store_recover_takes_back_expired_and_lost_jobs(store):
    expired, lost, alive = hexes("e", "l", "a")
    store.submit([(expired, "e", 1), (lost, "l", 1), (alive, "a", 1)], 0, 10)
    claim(store, "slow:1:x", -1)
    claim(store, "gone:1:x", 600)
    claim(store, "alive:1:x", 600)
    recovered = store.recover(max_attempts=3, lost_owners=["gone:1:x"])
    assert sorted(recovered) == sorted([(expired, "queued"), (lost, "queued")])
    assert store.get(alive)["status"] == "running"
    assert store.recover(max_attempts=3) == []
    assert store.counts()["queued"] == 2


@store_suite
def test_store_lists_newest_first_in_pages(store):
    tokens = [f"{n:032x}" for n in range(7)]
    store.submit([(token, f"j{n}", 0) for n, token in enumerate(tokens)], 0, 100)
    claim(store, "me:1:x", 60)
    page, before = store.list(limit=3)
    assert [job["token"] for job in page] == tokens[6:3:-1]
    page, before = store.list(before=before, limit=3)
    assert [job["token"] for job in page] == tokens[3:0:-1]
    page, before = store.list(before=before, limit=3)
    assert [job["token"] for job in page] == tokens[:1] and before is None
    assert [job["token"] for job in store.list(status="running")[0]] == tokens[:1]


@store_suite
def test_store_maintain_keeps_claims_on_their_index(store):
    store.submit([(f"{n:032x}", "x", 0) for n in range(300)], 0, 1000)
    store.maintain()  # PostgreSQL: fresh statistics; SQLite: its queries name their index
    assert [claim(store, "me:1:x", 60)["token"] for _ in range(3)] == [
        f"{n:032x}" for n in range(3)]


@both_stores
def test_store_listener_hears_other_processes_submit_and_cancel(db):
    here, there = queue_tool.open_store(db), queue_tool.open_store(db)
    listener = here.listen(64)
    deadline = time.monotonic() + 10

    def hear(want):
        while time.monotonic() < deadline:
            waiting, canceled = listener.wait(0.5)
            if want(waiting, canceled):
                return True
        return False
    listener.wait(0.05)  # the first look only sets its starting point
    token = hexes("w")[0]
    there.submit([(token, "w", 1)], 0, 10)
    assert hear(lambda waiting, canceled: waiting >= 1)
    claim(there, "me:1:x", 60)
    there.cancel(token)
    assert hear(lambda waiting, canceled: canceled)
    listener.close()
    here.close()
    there.close()


@store_suite
def test_store_refuses_every_call_once_closed(store):
    store.close()
    for call_it in (lambda: store.get(UNKNOWN_TOKEN), lambda: store.submit([], 1, 10),
                    lambda: claim(store, "me:1:x", 60), store.counters):
        with pytest.raises(queue_tool.StoreError, match="closed"):
            call_it()


def make_newer(db):
    if is_postgres(db):
        sql(db, "UPDATE queue_tool_schema SET version = 99")
    else:
        sql(db, "PRAGMA user_version = 99")


@both_stores
def test_store_refuses_a_database_of_a_newer_version(db, capsys):
    queue_tool.open_store(db).close()
    make_newer(db)
    with pytest.raises(queue_tool.StoreError, match="schema version 99 is newer"):
        queue_tool.open_store(db)
    assert queue_tool.main(["--port", "0", "--db", str(db)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "newer than this queue_tool" in lines[1]


# The schema of queue_tool 0.1.0, as its Store created it (it recorded no version).
SCHEMA_0_1_0 = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE,
        item TEXT NOT NULL, valor, status TEXT NOT NULL, created_at REAL NOT NULL,
        started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
        owner TEXT, lease_until REAL, progress REAL, result TEXT, error TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs (status, id)",
    ("CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at)"
     " WHERE finished_at IS NOT NULL"),
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


def test_sqlite_file_of_0_1_0_is_upgraded_with_its_jobs_and_counters(make, tmp_path):
    db = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        for statement in SCHEMA_0_1_0:
            connection.execute(statement)
        connection.executemany(
            "INSERT INTO jobs (token, item, valor, status, created_at, finished_at, attempts,"
            " result) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [("a" * 32, "waiting", 0, "queued", 1.7e9, None, 0, None),
             ("b" * 32, "finished", 2.5, "done", 1.7e9, 1.7e9 + 3, 1, '{"ok":true}')])
        connection.executemany("INSERT INTO counters (name, value) VALUES (?, ?)", [
            ("submitted", 2), ("invalid", 4), ("finished_done", 1), ("finished_failed", 0),
            ("finished_canceled", 0), ("queued", 1)])
    client = webtest.TestApp(make(db=db, workers=1))
    view = client.get("/check/" + "b" * 32, status=200).json
    assert (view["status"], view["valor"], view["result"]) == ("done", 2.5, {"ok": True})
    assert client.get("/check/" + "a" * 32 + "?wait=10", status=200).json["status"] == "done"
    counters = scrape(client)
    assert counters["queue_tool_jobs_submitted_total"] == 2
    assert counters["queue_tool_items_invalid_total"] == 4
    assert counters['queue_tool_jobs_finished_total{status="done"}'] == 2
    assert sql(db, "PRAGMA user_version") == [(queue_tool.SQLiteStore.VERSION,)]
    old = client.get("/check/" + "b" * 32, status=200).json
    assert (old["queue"], old["priority"], old["retries"]) == ("default", 0, 0)
    assert old["run_at"] == old["created_at"]


@both_stores
def test_a_database_of_version_3_opens_at_this_version_with_its_jobs_and_counters(make, db):
    """Today's released schema (version 3: built here from the oldest one and the
    upgrades up to 3) with a job in each state, then opened by this version (5)."""
    postgres = is_postgres(db)
    store_class = queue_tool.PostgresStore if postgres else queue_tool.SQLiteStore
    steps = [statement for version, statements in store_class.UPGRADES if version <= 3
             for statement in statements]
    if postgres:
        sql(db, "CREATE TABLE queue_tool_schema (version integer NOT NULL)")
        sql(db, "INSERT INTO queue_tool_schema VALUES (3)")
        for statement in (*SCHEMA_POSTGRES_1, *steps):
            sql(db, statement)
        sql(db, "INSERT INTO queue_tool_jobs (token, item, valor, status, run_at, attempts)"
                " VALUES (?, 'waiting', 1, 'queued', now(), 0),"
                " (?, 'finished', 2.5, 'done', now(), 1)", ("a" * 32, "b" * 32))
        sql(db, "INSERT INTO queue_tool_counters (name, shard, value) VALUES"
                " ('submitted', 0, 2), ('invalid', 3, 4), ('finished_done', 0, 1),"
                " ('queued', 0, 1)")
    else:
        for statement in (*SCHEMA_0_1_0, *steps, "PRAGMA user_version = 3"):
            sql(db, statement)
        sql(db, "INSERT INTO jobs (token, item, valor, status, created_at, run_at, attempts)"
                " VALUES (?, 'waiting', 1, 'queued', 1.7e9, 1.7e9, 0),"
                " (?, 'finished', 2.5, 'done', 1.7e9, 1.7e9, 1)", ("a" * 32, "b" * 32))
        sql(db, "INSERT INTO counters (name, value) VALUES ('submitted', 2), ('invalid', 4),"
                " ('finished_done', 1), ('queued', 1)")
    client = webtest.TestApp(make(db=db, workers=0))
    views = [client.get(f"/check/{name * 32}", status=200).json for name in "ab"]
    assert [(view["item"], view["status"], view["valor"]) for view in views] == [
        ("waiting", "queued", 1), ("finished", "done", 2.5)]
    assert not any({"unique", "expires", "schedule", "timeout"} & set(view) for view in views)
    # The upgrade named the jobs' queue: it is listed, without limits.
    assert client.get("/queues").json["queues"] == [
        {"name": "default", "queued": 1, "running": 0, "paused": False, "concurrency": None,
         "rate": None}]
    metrics = scrape(client)
    assert (metrics["queue_tool_jobs_submitted_total"], metrics["queue_tool_items_invalid_total"],
            metrics["queue_tool_items_duplicate_total"]) == (2, 4, 0)
    assert metrics['queue_tool_jobs{status="queued"}'] == 1
    version = "SELECT version FROM queue_tool_schema" if postgres else "PRAGMA user_version"
    assert sql(db, version) == [(6,)] == [(store_class.VERSION,)]
    (entry,) = entries(submit(client, [{"item": "new", "valor": 0, "unique": "k"}]))
    assert "duplicate" not in entry and client.get("/schedules").json == {"schedules": []}


def test_postgres_stores_starting_at_once_set_the_schema_up_once(db_postgres):
    opened, errors = [], []

    def open_one():
        try:
            opened.append(queue_tool.open_store(db_postgres))
        except queue_tool.StoreError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(opened) == 6
    assert sql(db_postgres, "SELECT version FROM queue_tool_schema") == [
        (queue_tool.PostgresStore.VERSION,)]
    for store in opened:
        store.close()


def test_postgres_claim_list_and_lease_scan_use_indexes(db_postgres):
    queue_tool.open_store(db_postgres).close()
    plans = {
        "claim": "SELECT id FROM queue_tool_jobs WHERE status = 'queued' AND run_at <= now()"
                 " ORDER BY priority DESC, run_at, id LIMIT 8 FOR UPDATE SKIP LOCKED",
        "next due": "SELECT min(run_at) FROM queue_tool_jobs WHERE status = 'queued'",
        "batch": "SELECT id FROM queue_tool_jobs WHERE batch = 'x' ORDER BY id",
        "list": "SELECT id FROM queue_tool_jobs WHERE status = 'done' AND id < 5"
                " ORDER BY id DESC LIMIT 9",
        "check": "SELECT * FROM queue_tool_jobs WHERE token = 'x'",
        "purge": "SELECT id FROM queue_tool_jobs WHERE finished_at < now() LIMIT 500",
        "owners": "SELECT DISTINCT owner FROM queue_tool_jobs WHERE status = 'running'",
    }
    import psycopg
    with psycopg.connect(db_postgres, autocommit=True) as connection:
        connection.execute("SET enable_seqscan = off")  # an empty table would not tell
        for name, query in plans.items():
            plan = "\n".join(row[0] for row in connection.execute("EXPLAIN " + query))
            assert "Index" in plan and "Seq Scan" not in plan and "Sort" not in plan, (
                name, plan)


def test_postgres_store_statements_walk_their_indexes(db_postgres):
    """The store's own statements, as it sends them, never scan the jobs table."""
    import psycopg
    store = queue_tool.PostgresStore
    queue_tool.open_store(db_postgres).close()
    claim = {"queues": None, "owner": "o", "lease": 30}
    listing = {"status": "done", "before": 5, "queue": None, "limit": 9}
    plans = {
        "claim": (store.CLAIM.format(limit=8), claim, "queue_tool_jobs_ready"),
        "claim in queues": (store.CLAIM.format(limit=8), {**claim, "queues": ["a", "b"]},
                            "queue_tool_jobs_ready"),
        "next due": (store.NEXT_DUE, {"queues": ["a"]}, "queue_tool_jobs_due"),
        "list": (store.LIST_BY_STATUS, listing, "queue_tool_jobs_status_id"),
        "batch": (store.GET_BATCH, ("x",), "queue_tool_jobs_batch"),
        "check": (store.GET_JOB, ("x",), "queue_tool_jobs_token_key"),
        "renew": (store.RENEW, {"tokens": ["x"], "attempts": [1], "owner": "o", "lease": 30},
                  "Index Scan"),  # which index depends on the rows: here, all are alike
        "owners": (store.RUNNING_OWNERS, None, "queue_tool_jobs_running"),
    }
    with psycopg.connect(db_postgres, autocommit=True) as connection:
        connection.execute("SET enable_seqscan = off")  # an empty table would not tell
        for name, (query, params, index) in plans.items():
            plan = "\n".join(row[0] for row in connection.execute("EXPLAIN " + query, params))
            assert index in plan and "Seq Scan on queue_tool_jobs" not in plan, (name, plan)


def test_postgres_failed_group_commit_records_nothing_and_the_pool_carries_on(
        db_postgres, caplog):
    store = queue_tool.open_store(db_postgres)
    try:
        store.submit([queue_tool.NewJob(f"t{n}", "x", 0) for n in range(3)], 0, 100)
        _, (first, _second) = store.finish_and_claim("owner", [], 2, 30)
        with pytest.raises(queue_tool.StoreError, match="operator does not exist"):
            # The end goes out first; the claim then fails (queues of the wrong type).
            store.finish_and_claim("owner", [(first["token"], 1, "done", None, None)], 1, 30,
                                   queues=[1])
        assert store.get(first["token"])["status"] == "running"  # the end was rolled back
        finished, claimed = store.finish_and_claim(
            "owner", [(first["token"], 1, "done", None, None)], 1, 30)
        assert finished == {first["token"]} and [job["token"] for job in claimed] == ["t2"]
        assert store.counters()["finished_done"] == 1
        assert "rolling back" not in caplog.text  # not left for the pool to clean up
    finally:
        store.close()


def test_postgres_ends_renewals_and_batch_cancels_never_deadlock(db_postgres):
    """Statements that lock several job rows lock them in one order. Here ends come
    in shuffled order while leases are renewed and a batch is canceled, in three
    threads; rows locked in the order given would deadlock within a few rounds."""
    store = queue_tool.open_store(db_postgres)
    errors = []

    def guarded(work):
        def run():
            try:
                work()
            except queue_tool.StoreError as exc:
                errors.append(exc)
        return threading.Thread(target=run)
    try:
        for round_ in range(30):
            batch = f"b{round_}"
            store.submit([queue_tool.NewJob(f"{round_}-{n}", "x", 0) for n in range(60)], 0,
                         10**6, batch=batch)
            _, claimed = store.finish_and_claim("owner", [], 40, 30)
            tokens = [job["token"] for job in claimed]
            shuffled = random.Random(round_).sample(tokens, len(tokens))
            threads = [
                guarded(lambda s=shuffled: store.finish_and_claim(
                    "owner", [(t, 1, "done", None, None) for t in s[:30]], 0, 30)),
                guarded(lambda t=tokens: store.renew("owner", dict.fromkeys(t[::-1], 1), 30)),
                guarded(lambda b=batch: store.cancel_batch(b))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert errors == [], errors
        assert sql(db_postgres, "SELECT count(*) FROM {jobs} WHERE status IN"
                                " ('queued', 'running')") == [(0,)]
    finally:
        store.close()


def test_both_stores_follow_the_one_store_contract():
    contract = {name: inspect.signature(method) for name, method in vars(queue_tool.Store).items()
                if callable(method) and not name.startswith("_")}
    assert {"submit", "finish_and_claim", "renew", "recover", "listen"} <= set(contract)
    for store in (queue_tool.SQLiteStore, queue_tool.PostgresStore):
        assert issubclass(store, queue_tool.Store)
        public = {name for name, value in vars(store).items()
                  if callable(value) and not name.startswith("_")}
        assert public == set(contract), store  # nothing more, nothing less
        for name, signature in contract.items():
            assert inspect.signature(getattr(store, name)) == signature, (store, name)


def schema_of(db):
    """A store's tables, columns and indexes, as its database describes them."""
    if is_postgres(db):
        ((schema,),) = sql(db, "SELECT current_schema()")
        columns = sql(db, "SELECT table_name, column_name, data_type, is_nullable, column_default,"
                          " is_identity FROM information_schema.columns"
                          " WHERE table_schema = current_schema()"
                          " ORDER BY table_name, ordinal_position")
        indexes = [(name, definition.replace(f"{schema}.", "")) for name, definition in sql(
            db, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
                " ORDER BY indexname")]
        return columns, indexes
    tables = [name for (name,) in sql(db, "SELECT name FROM sqlite_master WHERE type = 'table'"
                                          " ORDER BY name")]
    columns = [(table, *column) for table in tables
               for column in sql(db, f"PRAGMA table_xinfo({table})")]
    indexes = [(name, table, " ".join((text or "").split())) for name, table, text in sql(
        db, "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name")]
    return columns, indexes


@both_stores
def test_an_upgraded_database_has_the_schema_of_a_new_one(db, tmp_path):
    queue_tool.open_store(db).close()
    if is_postgres(db):
        with fresh_schema(POSTGRES) as old:
            sql(old, "CREATE TABLE queue_tool_schema (version integer NOT NULL)")
            sql(old, "INSERT INTO queue_tool_schema VALUES (1)")
            for statement in SCHEMA_POSTGRES_1:
                sql(old, statement)
            queue_tool.open_store(old).close()
            assert schema_of(old) == schema_of(db)
        return
    old = tmp_path / "old.sqlite3"
    for statement in SCHEMA_0_1_0:
        sql(old, statement)
    queue_tool.open_store(old).close()
    assert schema_of(old) == schema_of(db)


@store_suite
def test_store_takes_a_runs_calls_only_from_the_claim_that_started_it(store):
    """A run is its owner and its attempt: once the job was taken back and claimed
    again, even by the same owner, the old run's end, retry, progress and renewal
    change nothing."""
    token = hexes("f")[0]
    store.submit([queue_tool.NewJob(token, "f", 1, retries=1)], 0, 10)
    first = claim(store, "me:1:x", -1)  # a lease already run out: the run lost the job
    assert store.recover(max_attempts=5) == [(token, "queued")]
    second = claim(store, "me:1:x", 60)  # the same process takes it again
    assert (first["attempts"], second["attempts"]) == (1, 2)
    assert store.renew("me:1:x", {token: 1}, 600) == set()
    store.set_progress(token, "me:1:x", 1, 0.5)
    assert not store.retry(token, "me:1:x", 1, "stale", 0)
    assert store.finish_and_claim("me:1:x", [(token, 1, "done", '"old"', None)], 0, 0) == (
        set(), [])
    row = store.get(token)
    assert (row["status"], row["attempts"], row["progress"], row["result"]) == (
        "running", 2, None, None)
    assert store.renew("me:1:x", {token: 2}, 600) == {token}
    store.set_progress(token, "me:1:x", 2, 0.75)
    assert store.finish_and_claim("me:1:x", [(token, 2, "done", '"new"', None)], 0, 0)[0] == {
        token}
    row = store.get(token)
    assert (row["status"], row["result"], row["progress"]) == ("done", '"new"', 0.75)
    assert (store.counters()["finished_done"], store.counters()["retried"]) == (1, 0)


# -- Settings and the module-level app --------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"workers": -1}, {"workers": 1.5}, {"workers": True}, {"port": 70000},
    {"max_valor": float("nan")}, {"max_items": 0}, {"lease": 0}, {"max_attempts": 0},
    {"api_key": ""}, {"debug": "yes"}, {"db": ""},
])
def test_make_app_refuses_bad_settings(tmp_path, settings):
    with pytest.raises(queue_tool.SettingsError):
        queue_tool.make_app(**{"db": tmp_path / "q.sqlite3", **settings})


def test_make_app_refuses_an_unusable_db_path(tmp_path):
    with pytest.raises(queue_tool.StoreError, match="cannot use database"):
        queue_tool.make_app(db=tmp_path / "missing" / "q.sqlite3")


def test_settings_come_from_queue_tool_variables(tmp_path):
    settings = queue_tool.settings_from_env({
        "QUEUE_TOOL_WORKERS": "3", "QUEUE_TOOL_MAX_QUEUED": "7", "QUEUE_TOOL_LEASE": "2.5",
        "QUEUE_TOOL_DEBUG": "true", "QUEUE_TOOL_DB": str(tmp_path / "x.sqlite3"),
        "QUEUE_TOOL_API_KEY": ""})
    assert (settings.workers, settings.max_queued, settings.lease, settings.debug) == (
        3, 7, 2.5, True)
    assert settings.api_key is None and settings.db.endswith("x.sqlite3")


def test_settings_repr_hides_the_api_key():
    assert "hunter2" not in repr(queue_tool.Settings(api_key="hunter2"))


def test_bad_variable_is_named_in_the_error():
    with pytest.raises(queue_tool.SettingsError, match="QUEUE_TOOL_WORKERS: workers must be"):
        queue_tool.settings_from_env({"QUEUE_TOOL_WORKERS": "many"})


def test_module_app_is_built_from_the_environment(tmp_path):
    env_app = queue_tool.EnvApp({"QUEUE_TOOL_DB": str(tmp_path / "env.sqlite3"),
                                 "QUEUE_TOOL_WORKERS": "1"})
    try:
        client = webtest.TestApp(wsgiref.validate.validator(env_app))
        token = tokens_of(submit(client, [{"item": "a", "valor": 0}]))[0]
        assert client.get(f"/check/{token}?wait=5", status=200).json["status"] == "done"
        assert (tmp_path / "env.sqlite3").exists()
    finally:
        env_app.close()


def test_module_app_with_a_bad_variable_answers_500_misconfigured(caplog):
    env_app = queue_tool.EnvApp({"QUEUE_TOOL_WORKERS": "-3"})
    client = webtest.TestApp(env_app)
    for path in ("/health", "/api"):
        response = client.get(path, status=500)
        assert response.json["error"] == "misconfigured"
        assert "QUEUE_TOOL_WORKERS" in response.json["message"]
    assert caplog.text.count("misconfigured") == 1


def test_module_app_answers_503_until_its_database_is_there(tmp_path):
    db = tmp_path / "later" / "q.sqlite3"  # its folder does not exist yet
    env_app = queue_tool.EnvApp({"QUEUE_TOOL_DB": str(db), "QUEUE_TOOL_WORKERS": "1"})
    client = webtest.TestApp(env_app)
    try:
        response = client.get("/health", status=503)
        assert response.json["error"] == "store_unavailable"
        assert response.headers["Retry-After"] == "1"
        db.parent.mkdir()  # the database becomes reachable: no restart needed
        assert client.get("/health", status=200).json["status"] == "ok"
    finally:
        env_app.close()


def test_importing_the_module_builds_nothing(tmp_path):
    code = "import queue_tool; print(queue_tool.app._app)"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(HERE),
                                         "QUEUE_TOOL_WORKERS": "bad"}, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "None"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, env, says", [
    (["--workers", "-1"], {}, "workers must be at least 0"),
    (["--workers", "two"], {}, "workers must be a whole number"),
    (["--port", "99999"], {}, "port must be at most 65535"),
    (["--lease", "0"], {}, "lease must be above 0"),
    (["--no-such-flag"], {}, "unrecognized arguments"),
    ([], {"QUEUE_TOOL_MAX_ITEMS": "0"}, "QUEUE_TOOL_MAX_ITEMS: max_items must be at least 1"),
    ([], {"QUEUE_TOOL_DEBUG": "maybe"}, "QUEUE_TOOL_DEBUG: debug must be true or false"),
    (["--db", "{tmp}/missing/q.sqlite3"], {}, "cannot use database"),
    (["worker", "--workers", "0"], {}, "worker runs jobs: it needs --workers 1 or more"),
    (["--process", "nothing"], {}, "process must be module:function"),
    ([], {"QUEUE_TOOL_PROCESS": "no_such_module_q:run"}, "process: cannot load"),
    (["--pooler", "bouncy"], {}, "pooler must be one of none, session, transaction"),
    (["--listen-db", "{tmp}/q.sqlite3"], {}, "listen_db must be a postgresql:// URL"),
    ([], {"QUEUE_TOOL_POOLER": "transaction", "QUEUE_TOOL_DB": "{tmp}/q.sqlite3"},
     "listen_db and pooler are for a PostgreSQL db"),
    (["--log-level", "loud"], {}, "log_level must be one of debug, info, warning, error"),
    ([], {"QUEUE_TOOL_LOG_FORMAT": "xml"},
     "QUEUE_TOOL_LOG_FORMAT: log_format must be one of text, json"),
    (["--timeout", "0"], {}, "timeout must be a number of seconds above 0"),
])
def test_main_refuses_bad_settings_with_usage_and_exit_2(
        monkeypatch, capsys, tmp_path, argv, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert queue_tool.main(["--port", "0", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: queue_tool")
    assert says in lines[1] and "Traceback" not in lines[1]


def test_main_version(capsys):
    assert queue_tool.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"queue_tool {queue_tool.__version__}"


# -- Processors named by a setting ---------------------------------------------------------

TASKS_MODULE = """
import os
import socket

def shout(job):
    return job.item.upper()

def record(job):
    with open(os.environ["RECORD_FILE"], "a") as out:
        out.write(f"{job.token} {socket.gethostname()} {job.attempts}\\n")
    job.canceled.wait(job.valor)

not_callable = 42
"""


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    """A module `tasks_<random>` of processors in the working directory."""
    name = "tasks_" + secrets.token_hex(4)
    (tmp_path / f"{name}.py").write_text(TASKS_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


def test_process_setting_names_the_processor(make, tasks):
    client = webtest.TestApp(make(process=f"{tasks}:shout", workers=1))
    token = tokens_of(submit(client, [{"item": "quiet", "valor": 0}]))[0]
    assert client.get(f"/check/{token}?wait=5", status=200).json["result"] == "QUIET"


def test_module_app_takes_its_processor_from_the_environment(tmp_path, tasks):
    env_app = queue_tool.EnvApp({"QUEUE_TOOL_DB": str(tmp_path / "env.sqlite3"),
                                 "QUEUE_TOOL_PROCESS": f"{tasks}:shout"})
    try:
        client = webtest.TestApp(env_app)
        token = tokens_of(submit(client, [{"item": "env", "valor": 0}]))[0]
        assert client.get(f"/check/{token}?wait=5", status=200).json["result"] == "ENV"
    finally:
        env_app.close()


@pytest.mark.parametrize("spec, says", [
    ("no_such_module_q:run", "process: cannot load 'no_such_module_q:run': ModuleNotFound"),
    ("{tasks}:missing", "has no attribute 'missing'"),
    ("{tasks}:not_callable", "is not callable"),
    ("tasks", "process must be module:function"),
])
def test_bad_process_setting_is_refused(tmp_path, tasks, spec, says):
    spec = spec.format(tasks=tasks)
    with pytest.raises(queue_tool.SettingsError, match=re.escape(says)):
        queue_tool.make_app(db=tmp_path / "q.sqlite3", process=spec)
    response = webtest.TestApp(queue_tool.EnvApp({"QUEUE_TOOL_PROCESS": spec})).get(
        "/health", status=500)
    assert response.json["error"] == "misconfigured" and says in response.json["message"]


PROCESSOR_THAT_RETRIES = """
import sys

import queue_tool


def work(job):
    if job.attempts == 1:
        raise queue_tool.Retry(delay=1.0)
    running = sys.modules["__main__"]
    return {"same_module": getattr(running, "Retry", None) is queue_tool.Retry}
"""


@pytest.mark.parametrize("start", [["queue_tool.py"], ["-m", "queue_tool"]])
def test_processor_that_imports_queue_tool_sees_the_running_module(tmp_path, start):
    """Run as a script the module is __main__: `import queue_tool` in a processor must
    not load a second copy, whose Retry the workers would not know."""
    (tmp_path / "retrying.py").write_text(PROCESSOR_THAT_RETRIES)
    script = [str(HERE / start[0])] if start[0].endswith(".py") else start
    command = [sys.executable, *script, "--host", "127.0.0.1", "--port", "0", "--db",
               str(tmp_path / "q.sqlite3"), "--workers", "1", "--process", "retrying:work",
               "--retries", "1", "--retry-delay", "0.2"]
    server = Server(tmp_path, command, env={**os.environ, "PYTHONPATH": str(HERE)})
    try:
        status, body = server.request("POST", "/api", [{"item": "a", "valor": 0}])
        token = body["processing_items"][0]["hash"]
        status, view = server.request("GET", f"/check/{token}?wait=20")
        assert (status, view["status"], view["attempts"]) == (200, "done", 2)
        assert view["result"] == {"same_module": True}
        # The retry came after the processor's 1 s, not after --retry-delay's 0.2 s.
        assert iso_seconds(view["run_at"]) - iso_seconds(view["created_at"]) >= 0.999
    finally:
        assert server.stop() == 0


# -- PostgreSQL: set-up, secrets, outages, several machines -------------------------------

def test_postgres_url_without_the_driver_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None; import queue_tool;"
            " sys.exit(queue_tool.main(['--port', '0', '--db', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", code, "postgresql://u@127.0.0.1/db"],
                         check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(HERE)})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2
    assert "pip install 'queue_tool[postgres]'" in lines[1]


def test_unreachable_postgres_at_start_is_one_line_and_exit_2(capsys):
    pytest.importorskip("psycopg", reason="needs psycopg (pip install -e '.[test]')")
    url = "postgresql://someone:hunter2@127.0.0.1:1/jobs"  # nothing listens on port 1
    assert queue_tool.main(["--port", "0", "--db", url]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage:")
    assert "cannot use database postgresql://someone:***@127.0.0.1:1/jobs" in lines[1]
    assert "hunter2" not in lines[1]


def test_redact_hides_every_password_spelling():
    for url, shown in [
        ("postgresql://u:p%40ss@h:5/d", "postgresql://u:***@h:5/d"),
        ("postgres://h/d?user=u&password=pw&sslmode=require",
         "postgres://h/d?user=u&password=***&sslmode=require"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("/var/lib/q.sqlite3", "/var/lib/q.sqlite3"),
    ]:
        assert queue_tool.redact(url) == shown


def test_postgres_password_shows_nowhere(servers, db_postgres, capsys, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(4)
    # The test server trusts every local connection, so any password gets in.
    url = db_postgres.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    listen = db_postgres.replace("postgresql://postgres@",
                                 f"postgresql://postgres:{secret}-listen@")
    server = servers("--db", url, "--listen-db", listen, "--workers", "1", "--api-key", "k")
    key = {"Authorization": "Bearer k"}
    shown = [server.request("GET", "/health")[1], server.request("GET", "/openapi.json")[1]]
    for path in ("/metrics", "/"):
        with urllib.request.urlopen(urllib.request.Request(server.url + path, headers=key),
                                    timeout=30) as response:
            shown.append(response.read().decode())
    status, body = server.request("POST", "/api", [{"item": "a", "valor": 0}], key)
    shown.append(server.request("GET", f"/check/{body['processing_items'][0]['hash']}?wait=5"))
    sql(db_postgres, "ALTER TABLE queue_tool_jobs RENAME TO broken")  # now every read fails
    status, error = server.request("GET", "/jobs", headers=key)
    assert (status, error["error"]) == (503, "store_unavailable")
    shown.append(error)
    assert server.stop() == 0
    monkeypatch.setenv("QUEUE_TOOL_DB", url)
    monkeypatch.setenv("QUEUE_TOOL_LISTEN_DB", listen)
    assert queue_tool.main(["--help"]) == 0
    shown += [capsys.readouterr(), repr(queue_tool.settings_from_env()),
              server.log.read_text()]
    assert "postgresql://postgres:***@" in server.log.read_text()
    assert "the store failed" in server.log.read_text()
    for text in shown:
        assert secret not in str(text)


# -- A real server process ---------------------------------------------------------------

SERVING = r"serving on (http://127\.0\.0\.1:\d+)"
WORKING = r"working \(db "  # `queue-tool worker` is up: it has no URL
GUNICORN_LISTENING = r"Listening at: (http://127\.0\.0\.1:\d+)"


class Server:
    """A real server process on a free loopback port, its log in a file."""

    def __init__(self, tmp_path, command, name="server", env=None, ready=SERVING):
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=tmp_path, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
        self.url = found = None
        deadline = time.monotonic() + 30
        while found is None:
            found = re.search(ready, self.log.read_text())
            if found:
                self.url = found[1] if found.groups() else None
            elif self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not start:\n{self.log.read_text()}")
            else:
                time.sleep(0.02)

    def request(self, method, path, payload=None, headers=None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def servers(tmp_path):
    """Start `python queue_tool.py ARGS` processes; killed after the test if still up."""
    started = []

    def start(*args, name="server", env=None, ready=SERVING):
        command = [sys.executable, str(HERE / "queue_tool.py"), "--host", "127.0.0.1",
                   "--port", "0", *args]
        started.append(Server(tmp_path, command, name=name, env=env, ready=ready))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def gunicorn(tmp_path):
    """Start gunicorn on a free loopback port with APP (module:callable) and ENV."""
    started = []
    program = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which(
        "gunicorn")
    assert program, "gunicorn is in the test extra"

    def start(app, *args, env=(), workers=2, name="gunicorn"):
        environment = {**os.environ, **dict(env),
                       "PYTHONPATH": os.pathsep.join([str(tmp_path), str(HERE)])}
        command = [program, "-w", str(workers), "-k", "gthread", "--threads", "4",
                   "-b", "127.0.0.1:0", "--graceful-timeout", "5", *args, app]
        server = Server(tmp_path, command, name=name, env=environment,
                        ready=GUNICORN_LISTENING)
        started.append(server)
        wait_until(lambda: server.log.read_text().count("Booting worker") >= workers,
                   what="gunicorn's workers to boot")
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@both_stores
def test_served_end_to_end_submit_follow_and_stop(servers, db):
    server = servers("--db", str(db), "--workers", "2", "--grace", "0.5")
    status, body = server.request("POST", "/api", ORIGINAL_BATCH + [
        {"item": "quick", "valor": 0.2}])
    assert status == 202
    assert body["processing_items"][0]["error"] == "'valor' is a required property"
    token = body["processing_items"][2]["hash"]
    status, view = server.request("GET", f"/check/{token}?wait=10")
    assert (status, view["message"]) == (200, "Finalizado")
    status, view = server.request("GET", f"/check/{body['processing_items'][1]['hash']}")
    assert (status, view["message"]) == (200, "Em processamento")
    assert server.request("GET", f"/check/{UNKNOWN_TOKEN}") == (
        404, {"message": "no job has this token", "error": "not_found"})
    assert server.stop() == 0
    log = server.log.read_text()
    assert "POST /api 202" in log and "Traceback" not in log


@both_stores
def test_served_process_starts_workers_at_once(servers, make, db):
    queued = make(workers=0)
    tokens = tokens_of(submit(webtest.TestApp(queued), [{"item": "a", "valor": 0}] * 3))
    server = servers("--db", str(db), "--workers", "1")  # no request is sent to it
    wait_until(lambda: all(queued.store.get(t)["status"] == "done" for t in tokens),
               what="the served process to run the queued jobs")
    assert server.stop() == 0


def test_served_without_content_type_is_json(servers, tmp_path):
    server = servers("--db", str(tmp_path / "ct.sqlite3"), "--workers", "0")
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/api", body=b'[{"item": "a", "valor": 1}]')  # no Content-Type
    response = connection.getresponse()
    assert response.status == 202
    assert json.loads(response.read())["processing_items"][0]["status"] == "queued"
    connection.close()


def raw_exchange(connection, request):
    """Send raw bytes on a socket; the responses that arrive until it is idle or closed."""
    connection.sendall(request)
    data = b""
    connection.settimeout(0.5)
    with contextlib.suppress(TimeoutError):
        while chunk := connection.recv(65536):
            data += chunk
    return data


def hung_up(connection):
    try:
        return connection.recv(10) == b""
    except ConnectionResetError:  # closed with bytes unread: a reset, not a FIN
        return True


def test_served_keeps_connections_alive_between_requests(servers, tmp_path):
    server = servers("--db", str(tmp_path / "ka.sqlite3"), "--workers", "1",
                     "--max-body", "100000")
    client = queue_tool.Client(server.url)
    (token,) = [entry["hash"] for entry in client.submit([{"item": "a", "valor": 0}])[
        "processing_items"]]
    assert client.wait(token, 10)["status"] == "done"
    client.check(token)
    client.jobs()
    assert client._opened == 1  # HTTP/1.1: every call on one connection
    client.close()

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        # Two requests in one send: the first's body ends at its Content-Length.
        body = b'[{"item": "b", "valor": 0}]'
        head = (f"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        answer = raw_exchange(connection, head + body + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.count(b"HTTP/1.1 ") == 2 and b"Connection: close" not in answer
        assert b"HTTP/1.1 202 Accepted" in answer and b"HTTP/1.1 200 OK" in answer
        # A body the app refuses unread: a small one is skipped, and the connection serves on.
        answer = raw_exchange(connection, b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain"
                              b"\r\nContent-Length: 5\r\n\r\nhello" + b"GET /health HTTP/1.1\r\n\r\n")
        assert b"HTTP/1.1 415 " in answer and b"HTTP/1.1 200 OK" in answer
        # A large refused body (413) is not read through: the server says close, and closes.
        answer = raw_exchange(connection, b"POST /api HTTP/1.1\r\nContent-Type: application/json"
                              b"\r\nContent-Length: 200000\r\n\r\n[")
        assert b"HTTP/1.1 413 " in answer and b"Connection: close" in answer
        assert hung_up(connection)  # the rest of that body is never read
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        # A client that asks before sending its body (curl does) hears "100 Continue" at once.
        body = b'[{"item": "c", "valor": 0}]'
        assert raw_exchange(connection, (
            f"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
        ).startswith(b"HTTP/1.1 100 Continue\r\n")
        assert b"HTTP/1.1 202 Accepted" in raw_exchange(connection, body)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        # HTTP/1.0 asks for no keep-alive, so none is given.
        answer = raw_exchange(connection, b"GET /health HTTP/1.0\r\n\r\n")
        assert b" 200 OK" in answer and b"Connection: close" in answer
        assert hung_up(connection)
    assert server.stop() == 0


# -- The built-in server under load ------------------------------------------------------

def address_of(server):
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def proc_status(pid, field):
    """A number from /proc/<pid>/status: Threads, VmRSS (kB)..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_sockets(pid):
    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir()
               if os.readlink(fd).startswith("socket:"))


def health_answers_in(server):
    """Seconds GET /health takes on a new connection."""
    began = time.monotonic()
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert response.status == 200
    return time.monotonic() - began


@pytest.fixture
def many_descriptors():
    """Room for thousands of sockets in this process and the servers it starts."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 12_000:
        pytest.skip(f"the hard limit of open files is {hard}; these tests need 12,000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(address, count):
    sockets = []
    for _ in range(count):
        sockets.append(socket.create_connection(address, timeout=10))
    return sockets


def test_10000_silent_connections_hold_no_thread_and_health_answers(
        servers, tmp_path, many_descriptors):
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "0",
                     "--max-connections", "12000", "--grace", "1")
    pid, threads = server.process.pid, proc_status(server.process.pid, "Threads")
    silent = connect(address_of(server), 10_000)
    try:
        wait_until(lambda: open_sockets(pid) >= 10_000, what="10,000 connections accepted")
        assert health_answers_in(server) < 1
        assert proc_status(pid, "Threads") <= threads + 1  # no thread per connection
        assert proc_status(pid, "Threads") <= queue_tool.REQUEST_THREADS + 32
        assert proc_status(pid, "VmRSS") < 256 * 1024
    finally:
        for connection in silent:
            connection.close()
    assert health_answers_in(server) < 1  # closed all at once: nothing starves
    wait_until(lambda: open_sockets(pid) < 100, what="the closed connections let go")
    assert health_answers_in(server) < 1
    stopped = time.monotonic()
    assert server.stop() == 0 and time.monotonic() - stopped < 1 + 5


def test_silent_and_slow_clients_are_held_at_most_1000_and_closed_after_10s(
        servers, tmp_path, many_descriptors):
    silent_server = servers("--db", str(tmp_path / "a.sqlite3"), "--workers", "0",
                            "--grace", "1", name="silent")
    slow_server = servers("--db", str(tmp_path / "b.sqlite3"), "--workers", "0",
                          "--grace", "1", name="slow")
    opened = time.monotonic()
    silent = connect(address_of(silent_server), 1500)  # 500 wait in the listen backlog
    slow = connect(address_of(slow_server), 200)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    most, closed, sent = 0, {}, 0
    try:
        while time.monotonic() - opened < 13:
            if sent < len(request) and time.monotonic() - opened >= sent:  # a byte a second
                for connection in slow:
                    with contextlib.suppress(OSError):  # closed by the server at 10 s
                        connection.send(request[sent:sent + 1])
                sent += 1
            most = max(most, open_sockets(silent_server.process.pid) - 1)  # not the listener
            if sent == 3:
                assert health_answers_in(slow_server) < 1  # slow clients starve nobody
            for n in readable(silent[:1000] + slow):
                closed.setdefault(n, time.monotonic() - opened)
            time.sleep(0.2)
        assert most <= 1000 + 5  # a few store and wake-up sockets besides the clients
        assert len(closed) == 1200, "every held client is closed after its 10 s"
        assert min(closed.values()) >= 9.5  # 10 s to send a request's head
        assert hung_up(slow[0])
        wait_until(lambda: open_sockets(silent_server.process.pid) > 400,
                   what="the clients that waited in the backlog taken in")
    finally:
        for connection in silent + slow:
            connection.close()
    for server in (silent_server, slow_server):
        stopped = time.monotonic()
        assert server.stop() == 0 and time.monotonic() - stopped < 1 + 5


def readable(sockets):
    """The positions of the sockets with something to read (a close included), now."""
    import select
    poll = select.poll()
    for connection in sockets:
        poll.register(connection, select.POLLIN)
    at = {connection.fileno(): n for n, connection in enumerate(sockets)}
    return [at[fd] for fd, _ in poll.poll(0)]


def test_an_idle_kept_alive_connection_is_closed_after_keepalive(servers, tmp_path):
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "0",
                     "--keepalive", "0.5")
    with socket.create_connection(address_of(server), timeout=10) as connection:
        reader = connection.makefile("rb")
        for _ in range(3):  # each request within the keep-alive window: the same connection
            connection.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            assert reader.readline().startswith(b"HTTP/1.1 200 ")
            headers = list(iter(reader.readline, b"\r\n"))
            reader.read(next(int(line.split(b":")[1]) for line in headers
                             if line.lower().startswith(b"content-length:")))
            time.sleep(0.2)
        began = time.monotonic()
        assert reader.read(1) == b"" and 0.1 < time.monotonic() - began < 3


BAD_FRAMING = [
    (b"Content-Length: 30\r\nContent-Length: 2", "invalid_content_length"),
    (b"Content-Length: 30, 2", "invalid_content_length"),
    (b"Content-Length: 2\r\nTransfer-Encoding: chunked", "invalid_content_length"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 2", "invalid_content_length"),
    (b"Content-Length : 2", "invalid_header"),
    (b"Content-Length\t: 2", "invalid_header"),
    (b"X-Note: one\r\n  folded", "invalid_header"),
]


def test_framing_a_proxy_could_read_otherwise_is_400_and_closes(servers, tmp_path):
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "0")
    for headers, error in BAD_FRAMING:
        with socket.create_connection(address_of(server), timeout=10) as connection:
            answer = raw_exchange(connection, b"GET /health HTTP/1.1\r\n\r\nPOST /api HTTP/1.1"
                                  b"\r\nContent-Type: application/json\r\n" + headers
                                  + b"\r\n\r\n[]GET /health HTTP/1.1\r\n\r\n")
            first, second = answer.split(b"HTTP/1.1 ")[1:]  # what came after was not served
            assert first.startswith(b"200 ")
            head, _, body = second.partition(b"\r\n\r\n")
            assert head.startswith(b"400 ") and b"Connection: close" in head, headers
            assert json.loads(body)["error"] == error, headers
            assert hung_up(connection)


def test_a_repeated_equal_content_length_is_one_and_chunked_is_411(servers, tmp_path):
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "0")
    body = b'[{"item": "a", "valor": 0}]'
    with socket.create_connection(address_of(server), timeout=10) as connection:
        answer = raw_exchange(connection, (
            f"POST /api HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: "
            f"{len(body)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        assert answer.startswith(b"HTTP/1.1 202 ")
        answer = raw_exchange(connection, b"POST /api HTTP/1.1\r\nContent-Type: application/json"
                              b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 411 ") and b'"length_required"' in answer
        assert hung_up(connection)


def test_console_script_runs_main():
    script = shutil.which("queue-tool", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("queue-tool is not installed beside this Python (pip install -e .)")
    out = subprocess.run([script, "--version"], check=False, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, f"queue_tool {queue_tool.__version__}")


# -- Scaling out: PostgreSQL outages and several machines -----------------------------

def postgres_program(name):
    """A PostgreSQL server program (initdb, pg_ctl) from Debian's packages, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                   key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    return str(found[-1]) if found else shutil.which(name)


def free_port():
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL cluster on a free loopback port, to stop and start at will."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="queue_tool-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
        self._run(postgres_program("initdb"), "-D", self.root / "data", "-U", "postgres",
                  "-A", "trust", "--no-sync")

    def _run(self, *command):
        command = [str(part) for part in command]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self):
        self._run(postgres_program("pg_ctl"), "-D", self.root / "data", "-l",
                  self.root / "log", "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                  " -c fsync=off", "start")

    def stop(self, mode="fast"):
        self._run(postgres_program("pg_ctl"), "-D", self.root / "data", "-m", mode, "-w",
                  "stop")

    def remove(self):
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster(postgres):
    if not (postgres_program("initdb") and postgres_program("pg_ctl")):
        reason = "initdb and pg_ctl are needed (Debian's postgresql package)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    made = Cluster()
    made.start()
    yield made
    made.remove()


def answer(url, method="GET", payload=None):
    """(status, JSON body, headers) of one request; errors are answers too."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


@contextlib.contextmanager
def store_locked_elsewhere(db, seconds):
    """Another session holds the jobs table for `seconds` from now, whatever happens
    meanwhile: PostgreSQL's ACCESS EXCLUSIVE lock, SQLite's write lock."""
    locked_at = time.monotonic()
    if is_postgres(db):
        import psycopg
        connection = psycopg.connect(str(db))
        connection.execute("LOCK TABLE queue_tool_jobs IN ACCESS EXCLUSIVE MODE")
    else:
        connection = sqlite3.connect(db, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
    try:
        yield
        time.sleep(max(0.0, locked_at + seconds - time.monotonic()))  # the lock's length
    finally:
        connection.rollback()
        connection.close()


@both_stores
@pytest.mark.parametrize("timeout", [None, 2])
def test_a_store_locked_elsewhere_answers_503_within_the_bound_then_recovers(
        servers, db, timeout):
    """No request waits longer than store_timeout (5 s by default) for a stuck store,
    and nothing a refused request sent is kept."""
    bound = 5 if timeout is None else timeout
    server = servers("--db", str(db), "--workers", "1",
                     *([] if timeout is None else ["--store-timeout", str(timeout)]))
    (before,) = [entry["hash"] for entry in server.request(
        "POST", "/api", [{"item": "before", "valor": 0}])[1]["processing_items"]]
    assert server.request("GET", f"/check/{before}?wait=10")[1]["status"] == "done"
    answers = {}

    def ask(name, method, path, payload=None):
        started = time.monotonic()
        answers[name] = (*answer(server.url + path, method, payload),
                         time.monotonic() - started)
    with store_locked_elsewhere(db, bound + 3):  # past every request's bound
        asking = [threading.Thread(target=ask, args=args) for args in (
            ("submit", "POST", "/api", [{"item": "stuck", "valor": 0}]),
            ("health", "GET", "/health"), ("check", "GET", f"/check/{before}"))]
        for thread in asking:
            thread.start()
        for thread in asking:
            thread.join(30)
        print({name: (got[0], round(got[-1], 2)) for name, got in answers.items()})
        status, body, headers, took = answers["submit"]
        assert (status, body["error"], headers["Retry-After"]) == (503, "store_unavailable", "1")
        assert took < bound + 1.5, f"the submit took {took:.1f} s"
        for name in ("health", "check"):
            status, body, headers, took = answers[name]
            assert status in (200, 503) and took < bound + 1.5, (name, status, took)
    status, body = server.request("POST", "/api", [{"item": "after", "valor": 0}])
    (after,) = [entry["hash"] for entry in body["processing_items"]]
    assert server.request("GET", f"/check/{after}?wait=30")[1]["status"] == "done"
    assert server.request("GET", "/health")[0] == 200
    assert sorted(item for (item,) in sql(db, "SELECT item FROM {jobs}")) == ["after", "before"]
    assert server.stop() == 0


def test_postgres_outage_answers_503_then_recovers_by_itself(servers, cluster):
    server = servers("--db", cluster.url, "--workers", "4", "--lease", "2")
    accepted, refused, stop = [], collections.Counter(), threading.Event()

    def load():  # bounded: a batch at a time until told to stop, for at most 120 s
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            status, body, headers = answer(server.url + "/api", "POST",
                                           [{"item": "load", "valor": 0.02}] * 5)
            if status == 202:
                accepted.extend(entry["hash"] for entry in body["processing_items"])
            else:
                refused[status, body["error"], headers.get("Retry-After")] += 1
                stop.wait(0.05)
    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: len(accepted) >= 100, what="jobs accepted before the outage")
        cluster.stop()
        wait_until(lambda: refused[503, "store_unavailable", "1"] >= 3, timeout=60,
                   what="503 store_unavailable while the database is down")
        status, body, _ = answer(server.url + "/health")
        assert (status, body["error"]) == (503, "store_unavailable")
        cluster.start()
        wait_until(lambda: answer(server.url + "/health")[0] == 200, timeout=60,
                   what="the service to see the database again")
        after = len(accepted)
        wait_until(lambda: len(accepted) >= after + 100, timeout=60,
                   what="submits to succeed again")
    finally:
        stop.set()
        loader.join(60)
    assert set(refused) == {(503, "store_unavailable", "1")}
    for token in accepted:  # no job whose 202 was sent is lost
        status, view, _ = answer(f"{server.url}/check/{token}?wait=30")
        assert (status, view["status"]) == (200, "done"), token
    assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def can_set_host_names():
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--uts", "hostname", "queue-tool-probe"], check=False,
        capture_output=True, timeout=30).returncode == 0


def test_three_hosts_share_one_queue_and_take_over_a_killed_ones_jobs(
        tmp_path, db_postgres, tasks):
    """Three processes that each see their own host name, on one PostgreSQL."""
    if not can_set_host_names():
        if os.environ.get("CI"):
            pytest.fail("unshare --uts is needed to give each process its own host name")
        pytest.skip("unshare --uts is not allowed here")
    record = tmp_path / "runs.txt"
    env = {**os.environ, "RECORD_FILE": str(record)}
    hosts = {}
    for name in ("qt-host-a", "qt-host-b", "qt-host-c"):
        command = ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$0" "$@"',
                   sys.executable, str(HERE / "queue_tool.py"), "--host", "127.0.0.1",
                   "--port", "0", "--db", db_postgres, "--workers", "4", "--lease", "3",
                   "--process", f"{tasks}:record"]
        hosts[name] = Server(tmp_path, command, name=name, env=env)
    try:
        tokens = []
        for n in range(12):  # 600 jobs, 50 a batch, sent to each host in turn
            server = list(hosts.values())[n % 3]
            status, body = server.request("POST", "/api", [{"item": f"{n}", "valor": 0}] * 50)
            assert status == 202
            tokens += [entry["hash"] for entry in body["processing_items"]]
        for token in tokens:
            status, view = hosts["qt-host-a"].request("GET", f"/check/{token}?wait=30")
            assert (status, view["status"], view["attempts"]) == (200, "done", 1)
        runs = [line.split() for line in record.read_text().splitlines()]
        assert sorted(token for token, _, _ in runs) == sorted(tokens)  # each exactly once
        spread = collections.Counter(host for _, host, _ in runs)
        print("jobs run per host:", dict(spread))
        assert set(spread) == set(hosts) and min(spread.values()) >= 30

        status, body = hosts["qt-host-a"].request("POST", "/api",
                                                  [{"item": "slow", "valor": 2}] * 24)
        slow = [entry["hash"] for entry in body["processing_items"]]

        def running_on_c():
            return {token for (token,) in sql(
                db_postgres, "SELECT token FROM {jobs} WHERE status = 'running'"
                " AND owner LIKE 'qt-host-c:%'")}
        wait_until(lambda: len(running_on_c()) >= 2, what="jobs running on qt-host-c")
        hosts["qt-host-c"].stop(signal.SIGKILL)
        lost = running_on_c()  # what died with it; nothing else can change these rows now
        for token in slow:
            status, view = hosts["qt-host-b"].request("GET", f"/check/{token}?wait=30")
            assert (status, view["status"]) == (200, "done"), token
            assert view["attempts"] == (2 if token in lost else 1), token
        for name in ("qt-host-a", "qt-host-b"):
            assert hosts[name].stop() == 0
            assert "Traceback" not in hosts[name].log.read_text()
    finally:
        for server in hosts.values():
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


# -- PostgreSQL behind PgBouncer ---------------------------------------------------------

class PgBouncer:
    """A PgBouncer of the test's own on a free loopback port, in `mode`, in front of the
    tests' PostgreSQL server: every database name goes through to the server's."""

    def __init__(self, mode):
        import psycopg.conninfo
        server = psycopg.conninfo.conninfo_to_dict(POSTGRES)
        self.user = server.get("user") or "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="queue_tool-pgbouncer-"))
        self.port = free_port()
        (self.root / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={server.get('host') or '127.0.0.1'} port={server.get('port') or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'users.txt'}\n"
            f"pool_mode = {mode}\nmax_client_conn = 1000\ndefault_pool_size = 20\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\nlogfile = {self.root / 'pgbouncer.log'}\n")
        command = [pgbouncer_program(), str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (self.root / "pgbouncer.pid").exists() or not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"pgbouncer did not start:\n{self.log()}")
            time.sleep(0.02)

    def _listening(self):
        with contextlib.closing(socket.socket()) as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, direct):
        """The URL of `direct`'s database, through this pool."""
        dbname = direct.rpartition("/")[2].partition("?")[0]
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def log(self):
        path = self.root / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self):
        """Stop it by its pid (SIGTERM: at once) and wait for it to go."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.root / "pgbouncer.pid").read_text()), signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def pgbouncer_program():
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


def running_pgbouncer(mode):
    if not pgbouncer_program():
        reason = "pgbouncer is needed (Debian's pgbouncer package)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    pool = PgBouncer(mode)
    pool.mode = mode
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def pgbouncer_transaction(postgres):
    yield from running_pgbouncer("transaction")


@pytest.fixture(scope="session")
def pgbouncer_session(postgres):
    yield from running_pgbouncer("session")


@pytest.fixture
def fresh_database(postgres):
    """A new, empty database on the tests' server (a pool passes no search_path):
    its direct URL, dropped afterwards (ask for it before any app that uses it)."""
    import psycopg
    name = "qt_" + secrets.token_hex(6)
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{postgres.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(postgres, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_pgbouncer_web_and_worker_processes_share_one_queue_through_the_pool(
        request, fresh_database, servers, mode):
    """Transaction mode with a direct listener (listen_db), session mode with the
    listener through the pool too: 300 jobs done once, wake-ups within 50 ms."""
    pool = request.getfixturevalue(f"pgbouncer_{mode}")
    common = ["--db", pool.url(fresh_database), "--pooler", mode]
    if mode == "transaction":
        common += ["--listen-db", fresh_database]
    front = servers(*common, "--workers", "0", name="front")
    worker = servers("worker", *common, "--workers", "4", name="worker", ready=WORKING)
    for token in submit_in_batches(front, 300, 50):
        status, view = front.request("GET", f"/check/{token}?wait=30")
        assert (status, view["status"], view["attempts"]) == (200, "done", 1), view
    assert_jobs_start_within_50ms(front)  # the listener wakes the idle worker at once
    status, health = front.request("GET", "/health")
    assert (status, health["queued"], health["running"]) == (200, 0, 0)
    assert worker.stop() == 0 and front.stop() == 0
    for log in (front.log.read_text(), worker.log.read_text()):
        assert "prepared statement" not in log and "failed" not in log, log
        assert not re.search(r" 5\d\d \d+\.\dms", log), log  # no 5xx answered


PATIENT_MODULE = """
import os


def patient(job):
    if job.item == "long" and job.canceled.wait(60):
        with open(os.environ["RECORD_FILE"], "a") as out:
            out.write(job.token + "\\n")
"""


def test_pgbouncer_transaction_mode_alone_works_by_the_poll(
        fresh_database, servers, make, pgbouncer_transaction, tmp_path):
    """No listen_db: nothing LISTENs through the pool (it would be lost), the poll
    wakes the worker, and a cancel reaches the job when its lease is renewed."""
    (tmp_path / "patient_tasks.py").write_text(PATIENT_MODULE)
    record = tmp_path / "canceled.txt"
    pooled = pgbouncer_transaction.url(fresh_database)
    worker = servers("--db", pooled, "--pooler", "transaction", "--workers", "2",
                     "--lease", "3", "--process", "patient_tasks:patient", name="worker",
                     env={**os.environ, "RECORD_FILE": str(record)})
    client = webtest.TestApp(make(db=pooled, pooler="transaction", workers=0))
    key = {"Idempotency-Key": "pooled-1"}
    batch = [{"item": f"{n}", "valor": 0} for n in range(20)]
    first = submit(client, batch, headers=key)
    again = submit(client, batch, headers=key)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json == first.json
    view = client.get(first.json["check_batch"] + "?wait=20", status=200).json
    assert view["finished"] and view["counts"]["done"] == 20 and view["total"] == 20
    (long,) = tokens_of(submit(client, [{"item": "long", "valor": 60}]))
    wait_until(lambda: client.get(f"/check/{long}").json["status"] == "running",
               timeout=10, what="the long job to start")
    assert client.delete(f"/check/{long}", status=200).json["status"] == "canceled"
    wait_until(lambda: record.exists() and long in record.read_text(), timeout=10,
               what="the cancel to reach the job in the worker process")
    counters = scrape(client)
    assert counters["queue_tool_jobs_submitted_total"] == 21
    assert counters['queue_tool_jobs_finished_total{status="done"}'] == 20
    assert counters['queue_tool_jobs_finished_total{status="canceled"}'] == 1
    assert worker.stop() == 0
    log = worker.log.read_text()
    assert "no LISTEN through a transaction-mode pool" in log
    assert "prepared statement" not in log and "failed" not in log


# -- The Python client -----------------------------------------------------------------

@both_stores
def test_client_submits_waits_cancels_and_pages(servers, db):
    server = servers("--db", str(db), "--workers", "2")
    client = queue_tool.Client(server.url)
    accepted = client.submit([{"item": "a", "valor": 0}, {"item": "bad"}, {"item": "b", "valor": 0}])
    tokens = [entry["hash"] for entry in accepted["processing_items"]
              if entry["hash"] != "INVALID_JOB_REQUEST"]
    assert [job["status"] for job in client.wait(tokens, 10)] == ["done", "done"]
    assert client.batch(accepted["batch"], wait=10)["counts"]["done"] == 2
    assert client.check(tokens[0])["message"] == "Finalizado"
    (long,) = [entry["hash"] for entry in client.submit([{"item": "long", "valor": 600}])[
        "processing_items"]]
    wait_until(lambda: client.check(long)["status"] == "running")
    assert client.cancel(long)["status"] == "canceled"
    with pytest.raises(queue_tool.ClientError) as refused:
        client.cancel(long)
    assert (refused.value.status, refused.value.error) == (409, "already_finished")
    with pytest.raises(queue_tool.ClientError) as missing:
        client.check(UNKNOWN_TOKEN)
    assert (missing.value.status, missing.value.error) == (404, "not_found")
    slow = client.submit([{"item": "later", "valor": 1, "delay": 600}] * 3)
    view = client.cancel_batch(slow["batch"])
    assert view["counts"]["canceled"] == 3 and view["finished"]
    many = set()
    for start in range(0, 1200, 400):
        many.update(entry["hash"] for entry in client.submit(
            [{"item": f"page-{n}", "valor": 0, "delay": 600} for n in range(start, start + 400)]
        )["processing_items"])
    listed = [job["hash"] for job in client.jobs(status="queued")]
    assert len(listed) == len(set(listed)) == 1200 and set(listed) == many
    assert sum(1 for _ in client.jobs()) == 2 + 1 + 3 + 1200
    assert server.stop() == 0


def test_client_submit_spans_a_server_restart_and_queues_once(servers, tmp_path):
    db, port = tmp_path / "restart.sqlite3", str(free_port())
    servers("--db", str(db), "--port", port, "--workers", "0", name="before").stop()
    refused = threading.Event()

    class Watched(queue_tool.Client):
        def _request(self, *args, **kwargs):
            try:
                return super()._request(*args, **kwargs)
            except OSError:
                refused.set()  # the server is down: the client will retry
                raise
    client, answers = Watched(f"http://127.0.0.1:{port}", retries=8), []
    sender = threading.Thread(target=lambda: answers.append(
        client.submit([{"item": f"r{n}", "valor": 1} for n in range(4)])))
    sender.start()
    assert refused.wait(10)
    after = servers("--db", str(db), "--port", port, "--workers", "0", name="after")
    sender.join(60)
    assert answers and len(answers[0]["processing_items"]) == 4
    assert sql(db, "SELECT COUNT(*) FROM {batches}") == [(1,)]
    assert sql(db, "SELECT COUNT(*) FROM {jobs}") == [(4,)]
    assert after.stop() == 0


class DroppingProxy:
    """A loopback TCP proxy to `port` that loses the first answer it forwards, as a
    network would after the server had committed the request."""

    def __init__(self, port):
        self.port, self.dropped = port, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            while True:
                downstream, _ = self.listener.accept()
                with downstream, socket.create_connection(("127.0.0.1", self.port)) as upstream:
                    upstream.sendall(self._read_message(downstream))
                    answer = self._read_message(upstream)  # the server keeps the connection
                    self.dropped += 1  # counted before the client can hear the answer
                    if self.dropped > 1:
                        downstream.sendall(answer)

    @staticmethod
    def _read_message(connection):
        """One HTTP request or response, by its Content-Length."""
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
        while len(body) < length:
            body += connection.recv(65536)
        return head + b"\r\n\r\n" + body

    def close(self):
        self.listener.close()


def test_client_retry_after_a_lost_answer_gets_the_replay(servers, tmp_path):
    db = tmp_path / "lost.sqlite3"
    server = servers("--db", str(db), "--workers", "0")
    proxy = DroppingProxy(int(server.url.rsplit(":", 1)[1]))
    try:
        accepted = queue_tool.Client(proxy.url).submit([{"item": "once", "valor": 1}] * 3)
    finally:
        proxy.close()
    assert proxy.dropped == 2  # the first answer was lost, the retry's came through
    assert sql(db, "SELECT COUNT(*) FROM {jobs}") == [(3,)]
    assert [job["hash"] for job in queue_tool.Client(server.url).jobs()][::-1] == [
        entry["hash"] for entry in accepted["processing_items"]]
    assert "POST /api 202" in server.log.read_text()
    assert server.stop() == 0


def test_client_keeps_its_connection_where_the_server_offers_it(gunicorn, tmp_path):
    server = gunicorn("queue_tool:app", env={"QUEUE_TOOL_DB": str(tmp_path / "k.sqlite3"),
                                             "QUEUE_TOOL_WORKERS": "1"}, workers=1)
    client = queue_tool.Client(server.url)
    (token,) = [entry["hash"] for entry in client.submit([{"item": "a", "valor": 0}])[
        "processing_items"]]
    for _ in range(5):
        client.check(token)
    assert client.wait(token, 10)["status"] == "done"
    assert client._opened == 1  # HTTP/1.1 keep-alive: one connection for every call
    client.close()
    assert server.stop() == 0


def test_client_error_names_status_and_code(servers, tmp_path):
    server = servers("--db", str(tmp_path / "e.sqlite3"), "--workers", "0", "--api-key", "k")
    with pytest.raises(queue_tool.ClientError) as refused:
        queue_tool.Client(server.url).submit([{"item": "a", "valor": 1}])
    assert (refused.value.status, refused.value.error) == (401, "unauthorized")
    assert str(refused.value).startswith("401 unauthorized: ")
    keyed = queue_tool.Client(server.url + "/", api_key="k")
    with pytest.raises(queue_tool.ClientError) as bad:
        keyed.submit([])
    assert (bad.value.status, bad.value.error) == (400, "empty_batch")
    with pytest.raises(ValueError, match="url must be"):
        queue_tool.Client("ftp://example")
    assert server.stop() == 0


# -- The benchmark ---------------------------------------------------------------------------

def test_benchmark_smoke_run(tmp_path):
    """bench_queue_tool.py --quick runs and prints its table; no timing is asserted."""
    out = subprocess.run(
        [sys.executable, str(HERE / "bench_queue_tool.py"), "--quick", "--postgres", "",
         "--only", "submit,check,dispatch,makespan"], check=False, cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    table = rows[rows.index("| measure | queue_tool | reference | ratio | target | |"):]
    assert len(table) == 1 + 5  # the header, then one row per figure
    assert all(line.count("|") == 7 for line in table)


# -- Recurring jobs ------------------------------------------------------------------

JOB = {"item": "tick", "valor": 0}


def put_schedule(client, name, body, status=None, **kwargs):
    return client.put(f"/schedules/{name}", json.dumps(body), content_type="application/json",
                      status=status or "*", **kwargs)


def scheduled_jobs(db, name):
    """(slot, created_at) in epoch seconds of every job the schedule made, by slot."""
    if is_postgres(db):
        query = ("SELECT extract(epoch FROM slot)::float8, extract(epoch FROM created_at)::float8"
                 " FROM {jobs} WHERE schedule = ? ORDER BY slot")
    else:
        query = "SELECT slot, created_at FROM {jobs} WHERE schedule = ? ORDER BY slot"
    return sql(db, query, (name,))


def next_local(zone, hour, minute, after):
    """The next hour:minute in `zone` after the aware datetime `after` (no clock
    change near it): worked out with the calendar, not with queue_tool."""
    local = after.astimezone(zone)
    candidate = datetime.datetime.combine(local.date(), datetime.time(hour, minute), zone)
    if candidate <= local:
        candidate = datetime.datetime.combine(local.date() + datetime.timedelta(days=1),
                                              datetime.time(hour, minute), zone)
    return candidate


@both_stores
def test_schedule_routes_create_replace_list_get_and_delete(make):
    client = webtest.TestApp(make(workers=0))
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    before = datetime.datetime.now(datetime.UTC)
    job = {"item": "digest", "valor": 1, "queue": "mail", "priority": 2}
    created = put_schedule(client, "nightly", {"cron": "30 3 * * *", "timezone": "Europe/Berlin",
                                               "job": job}, 201)
    assert created.headers["Location"] == "/schedules/nightly"
    view = created.json
    assert view == {"name": "nightly", "cron": "30 3 * * *", "timezone": "Europe/Berlin",
                    "job": job, "paused": False, "next_run_at": view["next_run_at"],
                    "last_run_at": None, "last_job": None, "created_at": view["created_at"],
                    "updated_at": view["created_at"]}
    assert iso_seconds(view["next_run_at"]) == next_local(berlin, 3, 30, before).timestamp()
    assert abs(iso_seconds(view["created_at"]) - before.timestamp()) < 5
    replaced = put_schedule(client, "nightly", {"every": 60, "job": job, "paused": True}, 200)
    expected = {**view, "every": 60, "timezone": None, "paused": True, "next_run_at": None,
                "updated_at": replaced.json["updated_at"]}
    del expected["cron"]
    assert replaced.json == expected  # created_at and the last run kept
    assert replaced.json["updated_at"] >= view["updated_at"]
    put_schedule(client, "alpha", {"every": 3600.5, "job": JOB}, 201)
    listed = client.get("/schedules", status=200).json["schedules"]
    assert [entry["name"] for entry in listed] == ["alpha", "nightly"]
    assert listed[0]["every"] == 3600.5 and listed[1] == replaced.json
    assert client.get("/schedules/nightly", status=200).json == replaced.json
    assert client.delete("/schedules/nightly", status=200).json == replaced.json
    for method in ("GET", "DELETE"):
        for name in ("nightly", "Not-A-Name", "x" * 65):
            gone = client.request(f"/schedules/{name}", method=method, status=404).json
            assert gone == {"error": "not_found", "message": "no schedule has this name"}
    client.get("/schedules/", status=404)
    assert [entry["name"] for entry in client.get("/schedules").json["schedules"]] == ["alpha"]


INVALID_SCHEDULES = [
    ({"cron": "* * * * *", "every": 5, "job": JOB}, "a schedule needs exactly one of cron and every"),
    ({"job": JOB}, "a schedule needs exactly one of cron and every"),
    ({"cron": "* * * *", "job": JOB}, "cron '* * * *' needs five fields"),
    ({"cron": "@often", "job": JOB}, "cron '@often' needs five fields"),
    ({"cron": "60 * * * *", "job": JOB}, "cron's minute field '60': values run from 0 to 59"),
    ({"cron": "0 24 * * *", "job": JOB}, "cron's hour field '24'"),
    ({"cron": "0 0 0 * *", "job": JOB}, "cron's day of month field '0'"),
    ({"cron": "0 0 * 13 *", "job": JOB}, "cron's month field '13'"),
    ({"cron": "0 0 * * 8", "job": JOB}, "cron's day of week field '8'"),
    ({"cron": "0 0 * * 5-1", "job": JOB},
     "cron's day of week field '5-1': values run from 0 to 7, low to high"),
    ({"cron": "*/0 * * * *", "job": JOB},
     "cron's minute field '*/0': the step must be a whole number above 0"),
    ({"cron": "0 0 * * funday", "job": JOB},
     "cron's day of week field 'funday': 'funday' is not a value"),
    ({"cron": "0 0 30 2 *", "job": JOB}, "cron '0 0 30 2 *' matches no date"),
    ({"cron": 5, "job": JOB}, "cron must be a string"),
    ({"every": 0, "job": JOB}, "every must be a number of seconds from 1 to 31536000"),
    ({"every": 0.5, "job": JOB}, "every must be a number of seconds from 1 to 31536000"),
    ({"every": 31_536_001, "job": JOB}, "every must be a number of seconds from 1 to 31536000"),
    ({"every": True, "job": JOB}, "every must be a number of seconds"),
    ({"every": "5", "job": JOB}, "every must be a number of seconds"),
    ({"every": 5, "job": {"item": "x"}}, "job: 'valor' is a required property"),
    ({"every": 5, "job": {**JOB, "priority": 11}}, "job: 11 is greater than the maximum of 10"),
    ({"every": 5, "job": {**JOB, "valor": 3601}}, "job: 3601 is greater than the maximum of 3600"),
    ({"every": 5, "job": {**JOB, "delay": 5}}, "job: delay is not an option of a scheduled job"),
    ({"every": 5, "job": ["not", "an", "item"]}, "job must be an item"),
    ({"every": 5}, "job must be an item"),
    ({"cron": "* * * * *", "timezone": "Mars/Olympus_Mons", "job": JOB},
     "timezone 'Mars/Olympus_Mons' is not an IANA time zone"),
    ({"cron": "* * * * *", "timezone": "../../etc/passwd", "job": JOB},
     "timezone '../../etc/passwd' is not an IANA time zone"),
    ({"cron": "* * * * *", "timezone": 1, "job": JOB}, "timezone must be an IANA name"),
    ({"every": 5, "timezone": "UTC", "job": JOB}, "timezone is for cron schedules"),
    ({"every": 5, "job": JOB, "paused": "yes"}, "paused must be true or false"),
    ({"every": 5, "job": JOB, "evry": 5}, "unknown key 'evry'"),
    (["every", 5], "a schedule is a JSON object"),
]


@both_stores
def test_every_bad_schedule_is_400_invalid_schedule_and_stores_nothing(make):
    client = webtest.TestApp(make(workers=0))
    for body, message in INVALID_SCHEDULES:
        answer = put_schedule(client, "bad", body, 400).json
        assert answer["error"] == "invalid_schedule", body
        assert answer["message"].startswith(message), (body, answer["message"])
    named = put_schedule(client, "Bad_Name", {"every": 5, "job": JOB}, 400).json
    assert named == {"error": "invalid_schedule", "message":
                     "a schedule's name must match ^[a-z0-9][a-z0-9_.-]{0,63}$"}
    assert client.put("/schedules/bad", "{", content_type="application/json",
                      status=400).json["error"] == "invalid_json"
    assert client.put("/schedules/bad", "{}", content_type="text/plain",
                      status=415).json["error"] == "unsupported_media_type"
    assert client.get("/schedules").json == {"schedules": []}


def test_schedule_routes_need_the_api_key(keyed):
    headers = {"Authorization": "Bearer s3cret-key"}
    body = {"every": 60, "job": JOB}
    for method, path in [("GET", "/schedules"), ("GET", "/schedules/a"), ("PUT", "/schedules/a"),
                         ("DELETE", "/schedules/a")]:
        refused = keyed.request(path, method=method, body=json.dumps(body).encode(),
                                content_type="application/json", status=401)
        assert refused.json["error"] == "unauthorized"
    assert put_schedule(keyed, "a", body, 201, headers=headers).json["name"] == "a"
    assert keyed.get("/schedules", headers=headers).json["schedules"][0]["name"] == "a"
    keyed.get("/schedules/a", headers=headers, status=200)
    keyed.delete("/schedules/a", headers=headers, status=200)


@both_stores
def test_every_second_schedule_makes_one_job_per_slot_within_a_second(make, db):
    client = webtest.TestApp(make(workers=0))
    put_schedule(client, "tick", {"every": 1, "job": {**JOB, "queue": "ticks"}}, 201)
    wait_until(lambda: len(scheduled_jobs(db, "tick")) >= 4, timeout=15, what="four slots")
    made = scheduled_jobs(db, "tick")
    slots = [slot for slot, _ in made]
    assert all(slot == int(slot) for slot in slots)  # whole multiples of 1 s since the epoch
    assert [later - earlier for earlier, later in itertools.pairwise(slots)] == [1] * (len(slots) - 1)
    assert all(0 <= created - slot < 1 for slot, created in made), made
    view = client.get("/schedules/tick").json
    newest = client.get("/jobs?queue=ticks&limit=1").json["jobs"][0]
    assert (newest["schedule"], newest["item"], newest["queue"]) == ("tick", "tick", "ticks")
    if view["last_job"] == newest["hash"]:  # (unless the next slot came meanwhile)
        assert iso_seconds(view["last_run_at"]) == max(slots[-1], iso_seconds(
            newest["created_at"]) // 1)
    assert iso_seconds(view["next_run_at"]) > iso_seconds(view["last_run_at"])


@both_stores
def test_three_processes_on_one_store_make_exactly_one_job_per_slot(servers, db):
    fleet = [servers("--db", str(db), "--workers", "0", name=f"s{n}") for n in range(3)]
    status, _ = fleet[1].request("PUT", "/schedules/tick", {"every": 1, "job": JOB})
    assert status == 201
    wait_until(lambda: len(scheduled_jobs(db, "tick")) >= 6, timeout=30, what="6 slots")
    for server in fleet:
        assert server.stop() == 0
    slots = [slot for slot, _ in scheduled_jobs(db, "tick")]
    assert [later - earlier for earlier, later in itertools.pairwise(slots)] == [1] * (len(slots) - 1)
    # One job per slot, and no process made one that the store then dropped:
    # every counted submit is a job, and nothing counted as a duplicate.
    counters = dict(sql(db, "SELECT name, SUM(value) FROM {counters} GROUP BY name"))
    assert (counters["submitted"], counters["duplicate"]) == (len(slots), 0)


@both_stores
def test_scheduled_jobs_start_within_50ms_of_being_made(servers, db):
    """A web process and a worker process: whichever makes a slot's job, the idle
    worker is woken through the store (or in its own process), not by the poll."""
    web = servers("--db", str(db), "--workers", "0", name="web")
    servers("worker", "--db", str(db), "--workers", "2", name="worker", ready=WORKING)
    assert web.request("PUT", "/schedules/tick", {"every": 1, "job": JOB})[0] == 201
    wait_until(lambda: len(scheduled_jobs(db, "tick")) >= 4, timeout=15, what="four slots")
    body = web.request("GET", "/jobs?status=done&limit=10")[1]
    views = sorted(body["jobs"], key=lambda view: view["created_at"])[1:]  # one to warm up
    assert len(views) >= 2 and all(view["schedule"] == "tick" for view in views)
    for view in views:
        waited = iso_seconds(view["started_at"]) - iso_seconds(view["created_at"])
        assert waited < 0.05, f"a scheduled job started {waited * 1000:.1f} ms after it was made"


@both_stores
def test_a_schedule_row_that_cannot_be_read_stops_no_clock(make, db, caplog):
    """A row this version cannot use (written by another, say) is logged; the clock
    goes on, and once the row is gone the other schedules make their jobs again."""
    client = webtest.TestApp(make(workers=0))
    put_schedule(client, "broken", {"every": 1, "job": JOB, "paused": True}, 201)
    table = "queue_tool_schedules" if is_postgres(db) else "schedules"
    sql(db, f"UPDATE {table} SET cron = 'not cron', every = NULL, paused = false")
    with caplog.at_level(logging.INFO, logger="queue_tool"):
        put_schedule(client, "tick", {"every": 1, "job": JOB}, 201)
        wait_until(lambda: "making scheduled jobs failed" in caplog.text, timeout=10,
                   what="the failure to be logged")
        (late,) = tokens_of(submit(client, [{"item": "late", "valor": 0, "expires": 0.2}]))
        wait_until(lambda: client.get(f"/check/{late}").json["status"] == "canceled",
                   timeout=5, what="expiry, meanwhile")
        client.delete("/schedules/broken", status=200)
        wait_until(lambda: len(scheduled_jobs(db, "tick")) >= 2, timeout=15, what="two slots")
        assert "making scheduled jobs works again" in caplog.text
    assert caplog.text.count("making scheduled jobs failed") == 1  # logged once, not each look


@both_stores
def test_paused_schedule_makes_none_and_resuming_catches_up_once(make, db):
    client = webtest.TestApp(make(workers=0))
    put_schedule(client, "sleepy", {"every": 1, "job": JOB, "paused": True}, 201)
    put_schedule(client, "awake", {"every": 1, "job": JOB}, 201)
    wait_until(lambda: len(scheduled_jobs(db, "awake")) >= 3, timeout=15, what="three slots")
    assert scheduled_jobs(db, "sleepy") == []
    resumed_at = time.time()
    put_schedule(client, "sleepy", {"every": 1, "job": JOB}, 200)
    wait_until(lambda: len(scheduled_jobs(db, "sleepy")) >= 2, timeout=15, what="two slots")
    slots = [slot for slot, _ in scheduled_jobs(db, "sleepy")]
    missed = [slot for slot in slots if slot < resumed_at]
    assert len(missed) <= 1  # no backlog: the latest missed slot at most
    assert all(slot >= resumed_at - 1 for slot in missed)


@both_stores
def test_slots_missed_while_no_process_ran_make_one_catch_up_job_at_most(make, db):
    first = make(workers=0)
    put_schedule(webtest.TestApp(first), "tick", {"every": 1, "job": JOB}, 201)
    wait_until(lambda: len(scheduled_jobs(db, "tick")) >= 2, timeout=15, what="two slots")
    first.close()
    last = scheduled_jobs(db, "tick")[-1][0]
    wait_until(lambda: time.time() > last + 4, timeout=10, what="three slots with no process")
    restarted_at = time.time()
    second = make(workers=0)
    second.start()
    wait_until(lambda: scheduled_jobs(db, "tick")[-1][0] >= restarted_at + 1, timeout=15,
               what="a slot after the restart")
    later = [slot for slot, _ in scheduled_jobs(db, "tick") if slot > last]
    caught_up = [slot for slot in later if slot < restarted_at]
    assert len(caught_up) <= 1 and all(slot >= restarted_at - 1 for slot in caught_up), later
    assert len(later) >= 2


# (expression, zone, after, the next slot), local times worked out by hand. 2026: New
# York springs forward on 8 March (02:00 -> 03:00) and falls back on 1 November
# (02:00 EDT -> 01:00 EST); Kolkata is UTC+05:30 all year; 1 December is a Tuesday.
CRON_NEXT = [
    ("0 9 * * mon-fri", "UTC", "2026-12-04T09:00:00+00:00", "2026-12-07T09:00:00+00:00"),
    ("*/20 9-10 * * *", "UTC", "2026-12-01T10:40:00+00:00", "2026-12-02T09:00:00+00:00"),
    ("@weekly", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),
    ("0 12 13 * 5", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-04T12:00:00+00:00"),  # or Friday
    ("0 0 29 2 *", "UTC", "2026-03-01T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
    ("0 0 * * 7", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),  # 7 is Sunday
    ("0 0 1 jan,jul *", "UTC", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("30 2 * * *", "Asia/Kolkata", "2026-12-01T02:30:00+05:30", "2026-12-02T02:30:00+05:30"),
    ("0 0 * * *", "Asia/Kolkata", "2026-12-01T12:00:00+05:30", "2026-12-01T18:30:00+00:00"),
    ("15 * * * *", "Asia/Kolkata", "2026-12-01T10:20:00+05:30", "2026-12-01T11:15:00+05:30"),
    ("@daily", "Asia/Kolkata", "2026-12-31T23:59:00+05:30", "2027-01-01T00:00:00+05:30"),
    # A skipped local time does not run: 02:30 on 8 March is not a time in New York.
    ("30 2 * * *", "America/New_York", "2026-03-07T03:00:00-05:00", "2026-03-09T02:30:00-04:00"),
    ("0 * * * *", "America/New_York", "2026-03-08T01:30:00-05:00", "2026-03-08T03:00:00-04:00"),
    # A repeated one runs once, the first time: 01:30 happens twice on 1 November.
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00:00-04:00", "2026-11-01T01:30:00-04:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
    ("0 * * * *", "America/New_York", "2026-11-01T01:00:00-04:00", "2026-11-01T02:00:00-05:00"),
    ("0 9 * * *", "America/New_York", "2026-11-01T08:00:00-05:00", "2026-11-01T09:00:00-05:00"),
]


@pytest.mark.parametrize("expression, zone, after, expected", CRON_NEXT)
def test_cron_next_slot_in_its_time_zone(expression, zone, after, expected):
    schedule = {"cron": expression, "every": None, "timezone": zone}
    assert queue_tool.next_slot(schedule, iso_seconds(after)) == iso_seconds(expected)


@pytest.mark.parametrize("every, after, expected", [
    (1, 1000.2, 1001), (300, 1000, 1200), (300, 1200, 1500), (86400, 90000, 172800),
    (2.5, 10, 12.5)])
def test_every_next_slot_is_the_next_multiple_since_the_epoch(every, after, expected):
    schedule = {"cron": None, "every": every, "timezone": None}
    assert queue_tool.next_slot(schedule, after) == expected


CRON_AGAINST_CRONSIM = [
    "* * * * *", "*/15 * * * *", "0 9 * * mon-fri", "30 2 1,15 * *", "5 4 * * sun",
    "0 22 * * 1-5", "23 0-20/2 * * *", "0 0 1 jan *", "0 12 13 * 5", "0 0 29 2 *",
    "@hourly", "@daily", "@weekly", "@monthly", "@yearly", "15 10 * * 7", "0 */3 * * *",
    "0 0 */2 * *", "0 0 1 * mon", "1-10/3 5 * 6-8 *", "0 0 31 * *", "0 0 */2 * mon",
    "0 0 1-7 * */2", "59 23 28-31 * *", "0 0 * feb-apr 0,6"]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "Europe/Berlin"])
def test_cron_agrees_with_cronsim_where_no_clock_changes(zone):
    """The table checked against a maintained library; Berlin from May to September,
    when its clocks do not change (cronsim runs skipped times, which SPEC does not)."""
    cronsim = pytest.importorskip("cronsim")
    start = datetime.datetime(2026, 5, 17, 13, 37, 12, tzinfo=zoneinfo.ZoneInfo(zone))
    end = datetime.datetime(2026, 9, 30, tzinfo=datetime.UTC).timestamp()
    for expression in CRON_AGAINST_CRONSIM:
        theirs = cronsim.CronSim(queue_tool.CRON_MACROS.get(expression, expression), start)
        moment = start.timestamp()
        for _ in range(8):
            expected = next(theirs).timestamp()
            if zone == "Europe/Berlin" and expected > end:
                break
            moment = queue_tool.next_slot(
                {"cron": expression, "every": None, "timezone": zone}, moment)
            assert moment == expected, (expression, zone)


@store_suite
def test_putting_a_schedule_again_keeps_its_next_slot_unless_its_timing_changed(store, db):
    schedule = {"cron": None, "every": 60, "timezone": None, "job": JOB, "paused": False}
    row, created = store.put_schedule("s", schedule)
    assert created and row["next_run_at"] % 60 == 0
    table = "queue_tool_schedules" if is_postgres(db) else "schedules"
    old = "to_timestamp(600)" if is_postgres(db) else "600"
    sql(db, f"UPDATE {table} SET next_run_at = {old}")  # as if no process ran since then
    row, created = store.put_schedule("s", {**schedule, "job": {**JOB, "item": "new"}})
    assert not created and row["next_run_at"] == 600 and row["job"]["item"] == "new"
    row, _ = store.put_schedule("s", {**schedule, "every": 30})
    assert row["next_run_at"] > time.time() - 1
    assert store.delete_schedule("s")["every"] == 30 and store.delete_schedule("s") is None
    assert store.schedules() == [] and store.next_schedule() is None


def test_schedules_file_is_applied_at_start(servers, tmp_path):
    (tmp_path / "schedules.json").write_text(json.dumps({
        "nightly": {"cron": "0 3 * * *", "timezone": "Asia/Kolkata", "job": JOB},
        "tick": {"every": 1, "job": JOB, "paused": True}}))
    server = servers("--db", str(tmp_path / "s.sqlite3"), "--workers", "0",
                     "--schedules", "schedules.json")
    status, body = server.request("GET", "/schedules")
    assert status == 200 and [view["name"] for view in body["schedules"]] == ["nightly", "tick"]
    assert (body["schedules"][0]["timezone"], body["schedules"][1]["paused"]) == (
        "Asia/Kolkata", True)
    assert server.stop() == 0


@pytest.mark.parametrize("content, message", [
    (None, "schedules: cannot read 'schedules.json': No such file or directory"),
    ("{", "schedules: 'schedules.json': the file is not valid JSON"),
    ("[]", "schedules: the file must hold a JSON object {name: schedule}"),
    ('{"Bad Name": {"every": 5, "job": {"item": "a", "valor": 0}}}',
     "schedules: 'Bad Name': a schedule's name must match"),
    (('{"good": {"every": 5, "job": {"item": "a", "valor": 0}},'
      ' "nightly": {"cron": "0 25 * * *", "job": {"item": "a", "valor": 0}}}'),
     "schedules: 'nightly': cron's hour field '25'"),
])
def test_a_bad_schedules_file_is_exit_2_naming_the_schedule(tmp_path, content, message):
    if content is not None:
        (tmp_path / "schedules.json").write_text(content)
    run = subprocess.run([sys.executable, str(HERE / "queue_tool.py"), "--db", "s.sqlite3",
                          "--schedules", "schedules.json"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage:"), run.stderr
    assert lines[1].startswith(f"queue_tool: error: {message}"), run.stderr
    if content and "good" in content:  # a bad file applies none of its schedules
        assert sql(tmp_path / "s.sqlite3", "SELECT COUNT(*) FROM schedules") == [(0,)]


def test_client_puts_lists_and_deletes_schedules(servers, tmp_path):
    server = servers("--db", str(tmp_path / "c.sqlite3"), "--workers", "0", "--api-key", "k")
    client = queue_tool.Client(server.url, api_key="k")
    made = client.put_schedule("nightly", JOB, cron="0 3 * * *", timezone="Asia/Kolkata")
    assert (made["cron"], made["timezone"], made["paused"]) == ("0 3 * * *", "Asia/Kolkata", False)
    again = client.put_schedule("nightly", JOB, every=60, paused=True)
    assert (again["every"], again["paused"], again["created_at"]) == (60, True, made["created_at"])
    assert [view["name"] for view in client.schedules()] == ["nightly"]
    assert client.schedule("nightly") == again
    assert client.delete_schedule("nightly") == again and client.schedules() == []
    with pytest.raises(queue_tool.ClientError) as refused:
        client.put_schedule("nightly", JOB)
    assert (refused.value.status, refused.value.error) == (400, "invalid_schedule")
    with pytest.raises(queue_tool.ClientError) as missing:
        client.delete_schedule("nightly")
    assert missing.value.status == 404
    assert server.stop() == 0


# -- Unique jobs and expiry -----------------------------------------------------------

def entries(response):
    return response.json["processing_items"]


@both_stores
def test_a_unique_key_keeps_a_second_job_out_while_the_first_is_queued_or_running(
        make, gated, seen, gate, db):
    client = webtest.TestApp(make(process=gated, workers=1))
    first, twin = entries(submit(client, [{"item": "a", "valor": 0, "unique": "k"},
                                          {"item": "b", "valor": 0, "unique": "k"}]))
    token = first["hash"]
    assert twin == {"hash": token, "index": 1, "item": "b", "status": "queued",
                    "check": f"/check/{token}", "duplicate": True}  # the first of its batch
    assert started_jobs(seen, 1)[0].token == token
    (running,) = entries(submit(client, [{"item": "c", "valor": 0, "unique": "k"}]))
    assert (running["hash"], running["status"], running["duplicate"]) == (token, "running", True)
    gate.set()
    assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    (after,) = entries(submit(client, [{"item": "d", "valor": 0, "unique": "k"}]))
    assert "duplicate" not in after and after["hash"] != token  # done: the key is free
    assert client.get(f"/check/{after['hash']}").json["unique"] == "k"
    assert jobs_stored(db) == 2
    metrics = scrape(client)
    assert (metrics["queue_tool_jobs_submitted_total"],
            metrics["queue_tool_items_duplicate_total"]) == (2, 2)


@both_stores
def test_unique_for_keeps_the_key_out_after_the_job_ended_until_it_passed(make, db):
    client = webtest.TestApp(make(workers=1))
    item = {"item": "a", "valor": 0, "unique": "report", "unique_for": 1.5}
    (first,) = entries(submit(client, [item]))
    done = client.get(f"/check/{first['hash']}?wait=10").json
    assert done["status"] == "done"
    (again,) = entries(submit(client, [item]))
    assert (again["hash"], again["status"], again["duplicate"]) == (first["hash"], "done", True)
    wait_until(lambda: time.time() > iso_seconds(done["created_at"]) + 1.6, timeout=5,
               what="unique_for to pass")
    (later,) = entries(submit(client, [item]))
    assert "duplicate" not in later and later["hash"] != first["hash"]
    assert jobs_stored(db) == 2


@both_stores
def test_concurrent_submits_of_one_unique_key_on_two_servers_queue_one_job(servers, db):
    front = [servers("--db", str(db), "--workers", "0", name=f"front{n}") for n in range(2)]
    answers, go = [], threading.Event()

    def post(n):
        go.wait(10)
        answers.append(front[n % 2].request("POST", "/api", [
            {"item": f"i{n}", "valor": 0, "unique": "once"}]))
    threads = [threading.Thread(target=post, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(60)
    assert [status for status, _ in answers] == [202] * 20
    results = [body["processing_items"][0] for _, body in answers]
    new = [entry for entry in results if "duplicate" not in entry]
    assert len(new) == 1 and {entry["hash"] for entry in results} == {new[0]["hash"]}
    assert jobs_stored(db) == 1
    counters = dict(sql(db, "SELECT name, SUM(value) FROM {counters} GROUP BY name"))
    assert (counters["submitted"], counters["duplicate"], counters["queued"]) == (1, 19, 1)
    for server in front:
        assert server.stop() == 0


@both_stores
def test_a_job_that_cannot_start_in_time_expires_and_never_starts(make, gated, seen, gate):
    client = webtest.TestApp(make(process=gated, workers=1))
    submit(client, [{"item": "blocker", "valor": 0}])
    started_jobs(seen, 1)
    late, timely = tokens_of(submit(client, [{"item": "late", "valor": 0, "expires": 0.5},
                                             {"item": "timely", "valor": 0, "expires": 60}]))
    wait_until(lambda: client.get(f"/check/{late}").json["status"] == "canceled", timeout=5,
               what="the job to expire")
    view = client.get(f"/check/{late}").json
    assert (view["message"], view["error"], view["attempts"], view["started_at"]) == (
        "Cancelado", "expired", 0, None)
    assert 0 <= iso_seconds(view["finished_at"]) - iso_seconds(view["expires"]) < 1.0
    gate.set()
    assert client.get(f"/check/{timely}?wait=10").json["status"] == "done"
    assert [job.item for job in seen] == ["blocker", "timely"]
    assert client.get(f"/check/{late}").json["status"] == "canceled"
    metrics = scrape(client)
    assert metrics['queue_tool_jobs_finished_total{status="canceled"}'] == 1
    assert metrics['queue_tool_jobs{status="queued"}'] == 0


@store_suite
@pytest.mark.parametrize("keys", [10, 100])  # PostgreSQL: a lock per key; one for all
def test_store_sorts_out_the_duplicates_of_a_batch_of_unique_keys(store, keys):
    first = [queue_tool.NewJob(f"{n:032x}", "x", 0, unique=f"k{n}") for n in range(keys)]
    assert store.submit(first, 0, 1000) == ({}, None)
    # Half the keys are held (queued), half are new; the new ones twice in the batch.
    again = [queue_tool.NewJob(f"{n + 1000:032x}", "y", 0, unique=f"k{n}")
             for n in range(keys // 2, keys + keys // 2)]
    again += [queue_tool.NewJob(f"{n + 5000:032x}", "z", 0, unique=f"k{n}")
              for n in range(keys, keys + keys // 2)]
    duplicates, earlier = store.submit(again, 0, 1000)
    assert earlier is None
    held = {n: (f"{n + keys // 2:032x}", "queued") for n in range(keys - keys // 2)}
    twins = {keys + n: (f"{keys + n + 1000:032x}", "queued") for n in range(keys // 2)}
    assert duplicates == {**held, **twins}
    counters = store.counters()
    assert (counters["submitted"], counters["duplicate"], counters["queued"]) == (
        keys + keys // 2, keys, keys + keys // 2)


@store_suite
def test_a_claim_never_takes_an_expired_job_even_before_it_is_canceled(store):
    token = hexes("e")[0]
    store.submit([queue_tool.NewJob(token, "e", 0, expires=0.05)], 0, 10)
    wait_until(lambda: time.time() > store.get(token)["expires_at"] + 0.01, timeout=5,
               what="the deadline")
    assert claim(store, "me:1:x", 60) is None  # not claimed, though not yet canceled
    assert store.get(token)["status"] == "queued"
    assert store.expire() == [token] and store.expire() == []
    assert store.get(token)["status"] == "canceled" and store.counts()["queued"] == 0


# -- Retry and cancel by hand -----------------------------------------------------------

def failing_until(attempt):
    """A processor that raises until the job's `attempt`-th start."""
    def process(job):
        if job.attempts < attempt:
            raise RuntimeError(f"boom {job.attempts}")
        return {"attempts": job.attempts}
    return process


@both_stores
def test_a_failed_job_retried_by_hand_runs_again_with_its_retries(make):
    client = webtest.TestApp(make(process=failing_until(4), workers=1))
    (token,) = tokens_of(submit(client, [{"item": "flaky", "valor": 0, "retries": 1}]))
    failed = client.get(f"/check/{token}?wait=10").json
    assert (failed["status"], failed["attempts"], failed["error"]) == ("failed", 2, "boom 2")
    retried = client.post(f"/check/{token}/retry", status=200).json
    # The idle worker may start it before the answer reads it back.
    assert retried["status"] in ("queued", "running") and retried["finished_at"] is None
    done = client.get(f"/check/{token}?wait=10").json  # attempt 3 fails, its retry: 4
    assert (done["status"], done["attempts"], done["result"]) == ("done", 4, {"attempts": 4})
    assert "error" not in done
    for state_token, status in [(token, "done")]:
        refused = client.post(f"/check/{state_token}/retry", status=409).json
        assert refused == {"error": "not_retryable", "message":
                           f"the job is {status}; only a failed or canceled job can be retried"}
    client.post(f"/check/{UNKNOWN_TOKEN}/retry", status=404)
    client.post("/check/nonsense/retry", status=404)
    metrics = scrape(client)
    assert metrics['queue_tool_jobs_finished_total{status="failed"}'] == 1
    assert metrics['queue_tool_jobs_finished_total{status="done"}'] == 1
    assert metrics['queue_tool_jobs{status="queued"}'] == 0


@both_stores
def test_a_canceled_or_expired_job_retried_by_hand_runs_and_live_ones_refuse(
        make, gated, seen, gate, db):
    client = webtest.TestApp(make(process=gated, workers=1))
    blocker, canceled, expired = tokens_of(submit(client, [
        {"item": "blocker", "valor": 0}, {"item": "canceled", "valor": 0},
        {"item": "expired", "valor": 0, "expires": 0.1}]))
    started_jobs(seen, 1)
    client.delete(f"/check/{canceled}", status=200)
    wait_until(lambda: client.get(f"/check/{expired}").json.get("error") == "expired", timeout=5,
               what="the job to expire")
    for live, status in [(blocker, "running")]:
        assert client.post(f"/check/{live}/retry", status=409).json["message"].startswith(
            f"the job is {status}")
    assert client.post(f"/check/{canceled}/retry", status=200).json["status"] == "queued"
    queued = client.post(f"/check/{expired}/retry", status=200).json
    assert (queued["status"], "expires" in queued) == ("queued", False)  # free to start now
    assert client.post(f"/check/{canceled}/retry", status=409).json["message"].startswith(
        "the job is queued")
    assert_queued_gauge_is_true(db)
    gate.set()
    for token in (canceled, expired):
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    assert sorted(job.item for job in seen) == ["blocker", "canceled", "expired"]


@both_stores
def test_a_retry_by_hand_keeps_a_unique_key_to_one_live_job(make):
    client = webtest.TestApp(make(workers=0))
    first, second = tokens_of(submit(client, [{"item": "a", "valor": 0, "unique": "k"},
                                              {"item": "b", "valor": 0, "unique": "j"}]))
    client.delete(f"/check/{first}", status=200)
    client.delete(f"/check/{second}", status=200)
    (holder,) = tokens_of(submit(client, [{"item": "c", "valor": 0, "unique": "k"}]))
    refused = client.post(f"/check/{first}/retry", status=409).json
    assert refused == {"error": "not_retryable",
                       "message": "a queued or running job holds its unique key 'k'"}
    assert client.post("/jobs/retry", status=200).json == {"count": 1}  # j's, not k's
    assert client.get(f"/check/{second}").json["status"] == "queued"
    assert client.get(f"/check/{first}").json["status"] == "canceled"
    assert client.get(f"/check/{holder}").json["status"] == "queued"


@both_stores
def test_bulk_retry_and_cancel_take_the_filters_and_count_exactly(make, db):
    client = webtest.TestApp(make(workers=0))
    a = tokens_of(submit(client, [{"item": f"a{n}", "valor": 0, "queue": "a"} for n in range(3)]))
    b = tokens_of(submit(client, [{"item": f"b{n}", "valor": 0, "queue": "b"} for n in range(2)]))
    assert client.post("/jobs/cancel?queue=a", status=200).json == {"count": 3}
    assert client.post("/jobs/cancel?status=running", status=200).json == {"count": 0}
    assert client.post("/jobs/retry?status=failed", status=200).json == {"count": 0}
    assert client.post("/jobs/retry?status=canceled&queue=b", status=200).json == {"count": 0}
    assert client.post("/jobs/retry?queue=a", status=200).json == {"count": 3}
    assert {client.get(f"/check/{t}").json["status"] for t in a + b} == {"queued"}
    assert client.post("/jobs/cancel", status=200).json == {"count": 5}
    assert client.post("/jobs/retry?status=canceled", status=200).json == {"count": 5}
    for path, query in [("/jobs/retry", "status=done"), ("/jobs/retry", "status=queued"),
                        ("/jobs/cancel", "status=failed"), ("/jobs/cancel", "status="),
                        ("/jobs/cancel", "queue=Bad")]:
        error = client.post(f"{path}?{query}", status=400).json["error"]
        assert error == ("invalid_queue" if query.startswith("queue=") else "invalid_status")
    assert_queued_gauge_is_true(db)
    metrics = scrape(client)
    assert metrics['queue_tool_jobs_finished_total{status="canceled"}'] == 8
    assert (metrics['queue_tool_jobs{status="queued"}'],
            metrics["queue_tool_jobs_submitted_total"]) == (5, 5)


@both_stores
def test_bulk_cancel_stops_running_jobs_and_works_past_one_transaction(make, gated, seen, db):
    client = webtest.TestApp(make(process=gated, workers=2, max_queued=10_000))
    many = queue_tool.PURGE_BATCH + 20
    for start in range(0, many, 500):
        submit(client, [{"item": f"j{n}", "valor": 0} for n in range(start, min(start + 500, many))])
    running = started_jobs(seen, 2)
    assert client.post("/jobs/cancel", status=200).json == {"count": many}
    wait_until(lambda: all(job.canceled.is_set() for job in running), timeout=5,
               what="the running jobs to hear of it")
    assert client.post("/jobs/retry", status=200).json == {"count": many}
    started_jobs(seen, 4)  # both workers busy (gated) again: nothing claims meanwhile
    assert_queued_gauge_is_true(db)


def test_client_retries_and_cancels_by_hand(servers, tmp_path):
    server = servers("--db", str(tmp_path / "r.sqlite3"), "--workers", "0", "--api-key", "k")
    client = queue_tool.Client(server.url, api_key="k")
    tokens = [entry["hash"] for entry in client.submit(
        [{"item": f"i{n}", "valor": 0, "queue": "q"} for n in range(3)])["processing_items"]]
    assert client.cancel_jobs(queue="q") == 3 and client.cancel_jobs() == 0
    assert client.retry(tokens[0])["status"] == "queued"
    assert client.retry_jobs(status="canceled") == 2
    with pytest.raises(queue_tool.ClientError) as refused:
        client.retry(tokens[0])
    assert (refused.value.status, refused.value.error) == (409, "not_retryable")
    assert server.stop() == 0


# -- Flow control: queues, limits, timeouts, worker processes ------------------------------

def patch_queue(client, name, body, status=200, content_type="application/merge-patch+json"):
    return client.patch(f"/queues/{name}", json.dumps(body), status=status,
                        content_type=content_type)


@both_stores
def test_queues_are_listed_and_changed_with_json_merge_patches(make):
    client = webtest.TestApp(make(workers=0))
    assert client.get("/queues", status=200).json == {"queues": []}
    submit(client, [{"item": "a", "valor": 1, "queue": "mail"}] * 2 + [{"item": "b", "valor": 1}])
    plain = {"paused": False, "concurrency": None, "rate": None, "running": 0}
    assert client.get("/queues").json == {"queues": [
        {"name": "default", "queued": 1, **plain}, {"name": "mail", "queued": 2, **plain}]}
    steps = [  # each patch, and the settings after it
        ({"concurrency": 4}, {"paused": False, "concurrency": 4, "rate": None}),
        ({"rate": {"limit": 10}}, {"concurrency": 4, "rate": {"limit": 10, "per": 1.0}}),
        ({"rate": {"per": 2.5}}, {"rate": {"limit": 10, "per": 2.5}}),
        ({"paused": True, "concurrency": None}, {"paused": True, "concurrency": None}),
        ({}, {"paused": True, "concurrency": None, "rate": {"limit": 10, "per": 2.5}}),
        ({"rate": {"per": None}}, {"rate": {"limit": 10, "per": 1.0}}),
        ({"rate": None, "paused": None}, {"paused": False, "rate": None}),
        ({"concurrency": 2.0}, {"concurrency": 2}),
    ]
    for patch, expected in steps:
        view = patch_queue(client, "mail", patch).json
        assert {key: view[key] for key in expected} == expected, patch
        assert (view["name"], view["queued"]) == ("mail", 2)
        assert client.get("/queues/mail").json == view
    # A PATCH of a queue nothing named yet creates it; a GET of one does not.
    client.get("/queues/later", status=404)
    assert patch_queue(client, "later", {"paused": True}).json == {
        "name": "later", "queued": 0, "running": 0, "paused": True, "concurrency": None,
        "rate": None}
    assert [queue["name"] for queue in client.get("/queues").json["queues"]] == [
        "default", "later", "mail"]
    for route in ("/queues/Mail", "/queues/-x", "/queues/" + "a" * 65):
        assert client.get(route, status=400).json["error"] == "invalid_queue"
        assert patch_queue(client, route.split("/")[-1], {}, status=400).json[
            "error"] == "invalid_queue"
    refused = patch_queue(client, "mail", {}, status=415, content_type="text/plain").json
    assert refused["error"] == "unsupported_media_type"


@both_stores
def test_bad_queue_settings_are_400_and_change_nothing(make):
    client = webtest.TestApp(make(workers=0))
    before = patch_queue(client, "mail", {"concurrency": 3, "rate": {"limit": 5, "per": 2}}).json
    cases = [
        ([], "the body must be a JSON object"), ("paused", "the body must be a JSON object"),
        ({"pause": True}, "a queue has no setting 'pause'"),
        ({"paused": 1}, "paused must be true or false"),
        ({"paused": "yes"}, "paused must be true or false"),
        ({"concurrency": 0}, "concurrency must be a whole number from 1"),
        ({"concurrency": -1}, "concurrency must be a whole number from 1"),
        ({"concurrency": 1.5}, "concurrency must be a whole number from 1"),
        ({"concurrency": True}, "concurrency must be a whole number from 1"),
        ({"concurrency": "2"}, "concurrency must be a whole number from 1"),
        ({"concurrency": 2 ** 31}, "concurrency must be a whole number from 1 to 2147483647"),
        ({"rate": 5}, "rate must be an object"),
        ({"rate": {"limit": 0}}, "rate's limit must be a whole number from 1"),
        ({"rate": {"limit": None}}, "rate's limit must be a whole number from 1"),
        ({"rate": {"limit": 2, "per": 0}}, "rate's per must be a number of seconds above 0"),
        ({"rate": {"per": -1}}, "rate's per must be a number of seconds above 0"),
        ({"rate": {"per": 86401}}, "at most 86400 (a day)"),
        ({"rate": {"per": "1"}}, "rate's per must be a number"),
        ({"rate": {"limit": 2, "burst": 3}}, "a rate has no 'burst'"),
        ({"concurrency": 5, "rate": {"limit": -2}}, "rate's limit must be"),  # nothing applied
    ]
    for body, says in cases:
        refused = patch_queue(client, "mail", body, status=400).json
        assert refused["error"] == "invalid_queue_settings" and says in refused["message"], body
    assert client.get("/queues/mail").json == before
    for text in (b"", b"{", b"[1,", b'{"paused": NaN}'):
        response = client.patch("/queues/mail", text, content_type="application/json",
                                status=400)
        assert response.json["error"] == "invalid_json"
    patch_queue(client, "fresh", {"rate": {"per": 2}}, status=400)  # a rate needs its limit
    client.get("/queues/fresh", status=404)  # and the refused PATCH made no queue
    assert client.get("/queues/mail").json == before


def test_queue_settings_and_the_fleet_through_the_python_client(servers, tmp_path):
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "0")
    client = queue_tool.Client(server.url)
    try:
        assert client.queues() == []
        view = client.set_queue("mail", concurrency=2, rate={"limit": 5, "per": 60})
        assert (view["concurrency"], view["rate"]) == (2, {"limit": 5, "per": 60.0})
        assert client.set_queue("mail", rate=None, paused=True)["rate"] is None
        assert client.queue("mail")["paused"] is True
        assert [queue["name"] for queue in client.queues()] == ["mail"]
        with pytest.raises(queue_tool.ClientError) as refused:
            client.set_queue("mail", concurrency=0)
        assert (refused.value.status, refused.value.error) == (400, "invalid_queue_settings")
        with pytest.raises(queue_tool.ClientError) as unknown:
            client.queue("nothing")
        assert unknown.value.status == 404
        (process,) = client.workers()
        assert (process["pid"], process["http"], process["alive"]) == (
            server.process.pid, True, True)
    finally:
        client.close()
    assert server.stop() == 0


FLOW_TASKS = """
import json
import os
import time


def timed(job):
    started = time.time()
    job.canceled.wait(job.valor)
    with open(os.environ["TIMES_FILE"], "a") as out:
        out.write(json.dumps([job.token, job.queue, started, time.time(), os.getpid()]) + "\\n")


def stuck(job):
    if job.item == "stuck":
        time.sleep(600)  # deaf to its cancel event
    return job.item
"""


@pytest.fixture
def flow(tmp_path):
    """Start `queue_tool.py worker` processes running flowtasks:timed (or another of
    FLOW_TASKS); runs() reads what `timed` recorded: [token, queue, start, end, pid]."""
    (tmp_path / "flowtasks.py").write_text(FLOW_TASKS)
    times = tmp_path / "times.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TIMES_FILE": str(times)}
    started = []

    def start(db, *args, name="worker", process="flowtasks:timed", ready=WORKING):
        command = [sys.executable, str(HERE / "queue_tool.py"), "worker", "--db", str(db),
                   "--process", process, *args]
        started.append(Server(tmp_path, command, name=name, env=env, ready=ready))
        return started[-1]

    def runs():
        return [json.loads(line) for line in times.read_text().splitlines()] \
            if times.exists() else []
    start.runs = runs
    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def most_at_once(intervals):
    """The most of these (start, end) intervals that overlap at one time."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, change in events:  # at a tie an end (-1) sorts first: touching is not overlapping
        now += change
        most = max(most, now)
    return most


def job_starts(db, queue):
    rows = sql(db, "SELECT started_at FROM {jobs} WHERE queue = ?", (queue,))
    return sorted(value.timestamp() if isinstance(value, datetime.datetime) else value
                  for (value,) in rows)


@both_stores
def test_a_paused_queue_starts_nothing_in_any_process_and_resumes(make, flow, db):
    client = webtest.TestApp(make(workers=0))
    workers = [flow(db, "--workers", "4", name=f"worker{n}") for n in range(2)]
    patched = time.time()
    patch_queue(client, "held", {"paused": True})
    # SPEC: a change takes effect in every process within one second.
    while time.time() < patched + 1.0:
        time.sleep(0.05)
    # Higher priority than the control jobs: a claim that ignored the pause takes them first.
    held = tokens_of(submit(client, [{"item": "h", "valor": 0, "queue": "held",
                                      "priority": 10}] * 6))
    control = tokens_of(submit(client, [{"item": "c", "valor": 0.05}] * 12))
    wait_until(lambda: all(client.get(f"/check/{token}").json["status"] == "done"
                           for token in control), what="the control jobs")
    assert {client.get(f"/check/{token}").json["status"] for token in held} == {"queued"}
    assert client.get("/queues/held").json["queued"] == 6
    patch_queue(client, "held", {"paused": False})
    for token in held:
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    assert [worker.stop() for worker in workers] == [0, 0]


@both_stores
def test_concurrency_and_rate_hold_over_two_processes(make, flow, db):
    client = webtest.TestApp(make(workers=0))
    patch_queue(client, "pair", {"concurrency": 2})
    patch_queue(client, "paced", {"rate": {"limit": 4, "per": 1}})
    workers = [flow(db, "--workers", "8", name=f"worker{n}") for n in range(2)]
    tokens = tokens_of(submit(client, [{"item": "p", "valor": 0.05, "queue": "pair"}] * 24
                              + [{"item": "r", "valor": 0, "queue": "paced"}] * 12))
    for token in tokens:
        assert client.get(f"/check/{token}?wait=20").json["status"] == "done"
    pair = [(start, end) for _, queue, start, end, _ in flow.runs() if queue == "pair"]
    assert len(pair) == 24 and most_at_once(pair) == 2
    starts = job_starts(db, "paced")  # as the store recorded them, under its lock
    assert len(starts) == 12
    assert max(sum(start <= other < start + 1 for other in starts) for start in starts) == 4
    assert starts[-1] - starts[0] >= 2  # 12 starts at 4 a second span two seconds at least
    assert client.get("/queues/pair").json["running"] == 0
    assert [worker.stop() for worker in workers] == [0, 0]


@both_stores
def test_a_run_past_its_timeout_fails_and_the_setting_is_the_default(make):
    client = webtest.TestApp(make(workers=2, timeout=0.3))
    own, default, quick = tokens_of(submit(client, [
        {"item": "own", "valor": 30, "timeout": 0.2}, {"item": "default", "valor": 30},
        {"item": "quick", "valor": 0.5, "timeout": 5}]))  # its own timeout beats the setting
    for token, limit in ((own, "0.2"), (default, "0.3")):
        view = client.get(f"/check/{token}?wait=10").json
        assert (view["status"], view["error"]) == ("failed", f"timed out after {limit} s")
        ran = iso_seconds(view["finished_at"]) - iso_seconds(view["started_at"])
        assert float(limit) - 0.002 <= ran < 5  # on time, not after the 30 s of its valor
    assert client.get(f"/check/{quick}?wait=10").json["status"] == "done"
    assert client.get(f"/check/{own}").json["timeout"] == 0.2
    assert "timeout" not in client.get(f"/check/{default}").json
    invalid = submit(client, [{"item": "x", "valor": 1, "timeout": 0},
                              {"item": "x", "valor": 1, "timeout": 3601}]).json
    assert [entry["hash"] for entry in invalid["processing_items"]] == [
        "INVALID_JOB_REQUEST"] * 2


@both_stores
def test_a_processor_deaf_to_its_timeout_is_abandoned_and_its_late_return_changes_nothing(
        make, gate, seen):
    started = []

    def process(job):
        if job.item.startswith("deaf"):
            started.append(job)
            gate.wait(30)  # ignores its cancel event
            return "late"
        seen.append(job)
        job.canceled.wait(0.3)
        return "on time"
    built = make(process=process, workers=2)
    client = webtest.TestApp(built)
    deaf, again = tokens_of(submit(client, [
        {"item": "deaf", "valor": 0, "timeout": 0.2},
        {"item": "deaf again", "valor": 0, "timeout": 0.2, "retries": 1}]))
    failed = client.get(f"/check/{deaf}?wait=10").json
    assert (failed["status"], failed["error"]) == ("failed", "timed out after 0.2 s")
    # Its retry timed out too, on a fresh worker thread: two attempts, both abandoned.
    retried = client.get(f"/check/{again}?wait=10").json
    assert (retried["status"], retried["attempts"]) == ("failed", 2)
    assert retried["error"] == "timed out after 0.2 s"
    assert len(started) == 3 and built.runner.alive_workers() == 2
    # Three processors are still stuck, yet two jobs run at once here.
    pair = tokens_of(submit(client, [{"item": "a", "valor": 0}, {"item": "b", "valor": 0}]))
    wait_until(lambda: len(seen) == 2, what="both jobs started together")
    assert {client.get(f"/check/{token}").json["status"] for token in pair} == {"running"}
    for token in pair:
        assert client.get(f"/check/{token}?wait=10").json["status"] == "done"
    gate.set()  # the deaf processors return now: too late to count
    wait_until(lambda: not built.runner._abandoned, what="the abandoned threads to end")
    for token, attempts in ((deaf, 1), (again, 2)):
        view = client.get(f"/check/{token}").json
        assert (view["status"], view["attempts"], "result" in view) == ("failed", attempts, False)
    metrics = scrape(client)
    assert metrics['queue_tool_jobs_finished_total{status="failed"}'] == 2
    assert metrics['queue_tool_jobs_finished_total{status="done"}'] == 2
    assert metrics["queue_tool_workers"] == 2


def children_working(server, count):
    wait_until(lambda: server.log.read_text().count("working (db ") >= count, timeout=30,
               what=f"{count} child processes working")


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@both_stores
def test_worker_processes_share_jobs_a_killed_child_comes_back_and_sigterm_stops_all(
        make, flow, db):
    client = webtest.TestApp(make(workers=0))
    supervisor = flow(db, "--processes", "3", "--workers", "2", "--lease", "2",
                      ready=r"supervising 3 worker processes")
    children_working(supervisor, 3)
    tokens = tokens_of(submit(client, [{"item": "a", "valor": 0.05}] * 30))
    for token in tokens:
        assert client.get(f"/check/{token}?wait=20").json["status"] == "done"
    assert len({pid for *_, pid in flow.runs()}) >= 2  # several children took jobs
    long = tokens_of(submit(client, [{"item": "long", "valor": 1}] * 6))
    wait_until(lambda: client.get("/queues/default").json["running"] == 6,
               what="six jobs running in three children")
    (owner,) = sql(db, "SELECT owner FROM {jobs} WHERE token = ?", (long[0],))[0]
    victim = int(owner.split(":")[1])
    lost = [token for (token,) in sql(
        db, "SELECT token FROM {jobs} WHERE owner = ? AND status = 'running'", (owner,))]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: f"(pid {victim}) was killed by SIGKILL" in supervisor.log.read_text(),
               what="the supervisor to see its child die")
    children_working(supervisor, 4)  # started again
    for token in long:  # the killed child's jobs too, run again elsewhere
        assert client.get(f"/check/{token}?wait=20").json["status"] == "done"
    assert lost and all(client.get(f"/check/{token}").json["attempts"] == 2 for token in lost)
    children = [int(pid) for pid in re.findall(r"child \d started \(pid (\d+)\)",
                                               supervisor.log.read_text())]
    assert supervisor.stop() == 0
    assert not any(is_alive(pid) for pid in children)
    log_text = supervisor.log.read_text()
    assert log_text.count("stopped (status 0)") == 3 and "Traceback" not in log_text


def test_a_run_stuck_past_its_timeout_and_grace_restarts_its_child(make, flow, db):
    client = webtest.TestApp(make(workers=0))
    supervisor = flow(db, "--processes", "1", "--workers", "2", "--timeout", "0.3",
                      "--grace", "0.5", process="flowtasks:stuck",
                      ready=r"supervising 1 worker processes")
    children_working(supervisor, 1)
    (stuck,) = tokens_of(submit(client, [{"item": "stuck", "valor": 0}]))
    view = client.get(f"/check/{stuck}?wait=10").json
    assert (view["status"], view["error"]) == ("failed", "timed out after 0.3 s")
    wait_until(lambda: "still runs 0.5s after its timeout: this process ends" in
               supervisor.log.read_text(), what="the stuck child to give up")
    children_working(supervisor, 2)  # its supervisor started another
    assert "child 1 (pid" in supervisor.log.read_text()
    (quick,) = tokens_of(submit(client, [{"item": "quick", "valor": 0}]))
    assert client.get(f"/check/{quick}?wait=10").json["result"] == "quick"
    assert supervisor.stop() == 0


def test_processes_is_for_the_worker_command(tmp_path):
    for args, says in ((["--processes", "2"], "--processes is for the worker command"),
                       (["worker", "--processes", "0"], "processes must be a whole number")):
        out = subprocess.run([sys.executable, str(HERE / "queue_tool.py"), *args, "--db",
                              str(tmp_path / "q.sqlite3")], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 2 and says in out.stderr, out.stderr


@store_suite
def test_store_claims_limited_queues_within_their_limits(store):
    store.submit([queue_tool.NewJob(token, "x", 0, queue=queue) for queue in ("pair", "paced",
                                                                               "held", "free")
                  for token in hexes(*(f"{queue}{n}" for n in range(4)))], 0, 100)
    settings = {"pair": {"concurrency": 2}, "paced": {"rate": {"limit": 3, "per": 60}},
                "held": {"paused": True}}
    for name, patch in settings.items():
        store.set_queue(name, lambda before, patch=patch: queue_tool.merge_queue(before, patch))
    limits = store.queue_limits()
    assert sorted(limits) == ["held", "paced", "pair"]
    _, claimed = store.finish_and_claim("o:1:x", [], 16, 60, None, limits)
    taken = collections.Counter(job["queue"] for job in claimed)
    assert taken == {"pair": 2, "paced": 3, "free": 4}  # and nothing of the paused queue
    assert store.finish_and_claim("o:1:x", [], 16, 60, None, limits)[1] == []
    assert store.next_due(None, limits) == queue_tool.LIMIT_POLL  # "pair" waits for an end
    assert store.next_due(["paced"], limits) > 50  # its window frees a start in a minute
    assert store.next_due(["held"], limits) is None
    ended = next(job for job in claimed if job["queue"] == "pair")
    finished, again = store.finish_and_claim(
        "o:1:x", [(ended["token"], 1, "done", None, None)], 16, 60, None, limits)
    assert finished == {ended["token"]} and [job["queue"] for job in again] == ["pair"]
    assert {view["name"]: (view["queued"], view["running"]) for view in store.queues()} == {
        "free": (0, 4), "held": (4, 0), "paced": (1, 3), "pair": (1, 2)}
    # Resumed: its jobs are claimed again.
    store.set_queue("held", lambda before: queue_tool.merge_queue(before, {"paused": False}))
    limits = store.queue_limits()
    assert sorted(job["queue"] for job in store.finish_and_claim(
        "o:1:x", [], 16, 60, None, limits)[1]) == ["held"] * 4
    store.maintain()  # prunes the rate's starts no window counts; keeps the rest
    assert store.finish_and_claim("o:1:x", [], 16, 60, ["paced"], limits)[1] == []


# -- Logs: levels and formats -------------------------------------------------------------

def test_json_logs_are_one_object_a_line_with_the_events_fields(servers, tmp_path):
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "1",
                     "--log-format", "json", "--log-level", "debug")
    body = server.request("POST", "/api", [{"item": "a", "valor": 0}])[1]
    token = body["processing_items"][0]["hash"]
    assert server.request("GET", f"/check/{token}?wait=10")[1]["status"] == "done"
    assert server.stop() == 0
    events = [json.loads(line) for line in server.log.read_text().splitlines()]
    assert all({"time", "level", "message"} <= set(event) for event in events)
    assert all(event["level"] in ("debug", "info", "warning", "error") for event in events)
    (posted,) = [event for event in events if event.get("path") == "/api"]
    assert (posted["method"], posted["status"], posted["level"]) == ("POST", 202, "info")
    assert posted["duration_ms"] >= 0 and posted["message"].startswith("POST /api 202 ")
    done = [event for event in events if event.get("token") == token]
    assert [(event["level"], event.get("status")) for event in done] == [
        ("debug", None), ("debug", "done")]  # its start, then its end
    assert done[1]["attempt"] == 1 and done[1]["duration_ms"] >= 0
    assert datetime.datetime.fromisoformat(events[0]["time"]).tzinfo is not None


def test_info_writes_no_line_per_job(servers, tmp_path):
    """At the default level a busy service writes no line per job; failures still show."""
    server = servers("--db", str(tmp_path / "q.sqlite3"), "--workers", "2")
    body = server.request("POST", "/api", [{"item": "a", "valor": 0},
                                           {"item": "slow", "valor": 5, "timeout": 0.1}])[1]
    token, slow = [entry["hash"] for entry in body["processing_items"]]
    assert server.request("GET", f"/check/{token}?wait=10")[1]["status"] == "done"
    assert server.request("GET", f"/check/{slow}?wait=10")[1]["status"] == "failed"
    assert server.stop() == 0
    text = server.log.read_text()
    assert "POST /api 202" in text and f"GET /check/{token}" in text
    assert f"job {token}" not in text and "DEBUG" not in text
    assert f"WARNING job {slow} timed out after 0.1 s" in text
    assert f"INFO job {slow} failed in" in text


@pytest.fixture
def module_logger():
    """queue_tool's logger as a test found it, put back after."""
    logger = logging.getLogger("queue_tool")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield logger
    logger.setLevel(level)
    logger.handlers[:], logger.propagate = handlers, propagate


def test_the_module_app_logs_at_the_level_and_in_the_format_its_variables_say(
        tmp_path, module_logger, caplog, capfd):
    env_app = queue_tool.EnvApp({"QUEUE_TOOL_DB": str(tmp_path / "w.sqlite3"),
                                 "QUEUE_TOOL_WORKERS": "0", "QUEUE_TOOL_LOG_LEVEL": "warning"})
    try:
        webtest.TestApp(env_app).get("/health", status=200)
    finally:
        env_app.close()
    assert module_logger.level == logging.WARNING
    assert not [record for record in caplog.records if record.name == "queue_tool"
                and record.levelno < logging.WARNING]
    json_app = queue_tool.EnvApp({"QUEUE_TOOL_DB": str(tmp_path / "j.sqlite3"),
                                  "QUEUE_TOOL_WORKERS": "0", "QUEUE_TOOL_LOG_FORMAT": "json",
                                  "QUEUE_TOOL_LOG_LEVEL": "info"})
    try:
        webtest.TestApp(json_app).get("/health", status=200)
    finally:
        json_app.close()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{")]
    health = lines[-1]
    assert (health["level"], health["method"], health["path"], health["status"]) == (
        "info", "GET", "/health", 200)
    assert health["message"].startswith("GET /health 200 ")


# -- The fleet: processes, heartbeats, histograms -----------------------------------------

def process_of(processes, pid):
    (found,) = [process for process in processes if process["pid"] == pid]
    return found


@both_stores
def test_workers_lists_the_fleet_with_heartbeats_and_sees_a_stop_and_a_kill(
        servers, flow, db):
    server = servers("--db", str(db), "--workers", "1", "--queues", "default,other",
                     "--grace", "0.5")
    worker = flow(db, "--workers", "2", "--queues", "slow", "--grace", "0.5")
    quick = server.request("POST", "/api", [{"item": "q", "valor": 0}])[1]
    quick = quick["processing_items"][0]["hash"]
    slow = server.request("POST", "/api", [{"item": "s", "valor": 60, "queue": "slow"}])[1]
    slow = slow["processing_items"][0]["hash"]
    assert server.request("GET", f"/check/{quick}?wait=10")[1]["status"] == "done"
    wait_until(lambda: server.request("GET", f"/check/{slow}")[1]["status"] == "running")

    status, body = server.request("GET", "/workers")
    assert status == 200 and len(body["processes"]) == 2
    serving = process_of(body["processes"], server.process.pid)
    working = process_of(body["processes"], worker.process.pid)
    for process in (serving, working):
        assert list(process) == list(queue_tool.PROCESS_FIELDS)
        assert process["host"] == socket.gethostname() and process["alive"] is True
        assert process["version"] == queue_tool.__version__
        assert process["id"].split(":")[:2] == [process["host"], str(process["pid"])]
        assert process["started_at"] <= process["heartbeat_at"]
    assert (serving["http"], serving["workers"], serving["queues"], serving["busy"]) == (
        True, 1, ["default", "other"], 0)
    assert (working["http"], working["workers"], working["queues"], working["busy"]) == (
        False, 2, ["slow"], 1)
    # Each job names the process that ran it.
    assert server.request("GET", f"/check/{quick}")[1]["worker"] == serving["id"]
    assert server.request("GET", f"/check/{slow}")[1]["worker"] == working["id"]
    wait_until(lambda: process_of(server.request("GET", "/workers")[1]["processes"],
                                  worker.process.pid)["heartbeat_at"] > working["heartbeat_at"],
               timeout=queue_tool.HEARTBEAT + 2, what="the worker's heartbeat to move")

    assert server.stop() == 0
    store = queue_tool.open_store(str(db))
    try:  # a clean stop says so at once; gone ones stay listed
        assert [(p["pid"], p["alive"]) for p in store.processes()] == [
            (worker.process.pid, True), (server.process.pid, False)]
    finally:
        store.close()


def test_a_killed_process_is_gone_within_20s_on_either_store(flow, tmp_path, db_postgres):
    """Its heartbeat stops: not alive after ALIVE_WITHIN seconds. Both stores in one test,
    waiting side by side (the wait is most of its time)."""
    dbs = [tmp_path / "q.sqlite3", db_postgres]
    workers = [flow(db, "--workers", "1", name=f"worker-{n}") for n, db in enumerate(dbs)]
    stores = [queue_tool.open_store(str(db)) for db in dbs]
    try:
        for worker, store in zip(workers, stores, strict=True):
            assert process_of(store.processes(), worker.process.pid)["alive"]
            worker.process.kill()
        killed = time.monotonic()
        for worker, store in zip(workers, stores, strict=True):
            wait_until(lambda s=store, pid=worker.process.pid: not process_of(
                s.processes(), pid)["alive"], timeout=20 - (time.monotonic() - killed),
                what="the killed worker gone")
    finally:
        for store in stores:
            store.close()


def backdate_heartbeat(db, process_id, seconds):
    """Move a process's last heartbeat `seconds` into the past, in the store."""
    if is_postgres(db):
        sql(db, "UPDATE queue_tool_processes SET heartbeat_at = heartbeat_at - ? * interval '1s'"
                " WHERE id = ?", (seconds, process_id))
    else:
        sql(db, "UPDATE processes SET heartbeat_at = heartbeat_at - ? WHERE id = ?",
            (seconds, process_id))


@store_suite
def test_store_keeps_the_fleet_heartbeats_stops_and_purges_the_gone(store, db):
    record = {"id": "h:1:a", "host": "h", "pid": 1, "version": "9", "http": True,
              "workers": 4, "queues": None}
    store.register(record)
    store.register({**record, "id": "h:2:b", "pid": 2, "http": False, "queues": ["x", "y"]})
    store.register({**record, "id": "h:3:c", "pid": 3})
    token = hexes("f")[0]
    store.submit([queue_tool.NewJob(token, "f", 0)], 0, 10)
    assert claim(store, "h:2:b", 60)["token"] == token
    listed = store.processes()
    assert [(p["id"], p["busy"], p["alive"], p["queues"]) for p in listed] == [
        ("h:1:a", 0, True, None), ("h:2:b", 1, True, ["x", "y"]), ("h:3:c", 0, True, None)]
    before = listed[0]["heartbeat_at"]
    assert store.heartbeat("h:1:a", 3) and not store.heartbeat("h:9:z", 1)
    (first,) = [p for p in store.processes() if p["id"] == "h:1:a"]
    assert first["heartbeat_at"] >= before and first["workers"] == 3
    store.unregister("h:3:c")
    assert not store.heartbeat("h:3:c", 4)  # a stopped one stays stopped
    backdate_heartbeat(db, "h:2:b", queue_tool.ALIVE_WITHIN + 1)  # its heartbeat stopped
    assert [(p["id"], p["alive"]) for p in store.processes()] == [
        ("h:1:a", True), ("h:2:b", False), ("h:3:c", False)]  # alive ones first
    backdate_heartbeat(db, "h:2:b", queue_tool.GONE_KEPT)
    backdate_heartbeat(db, "h:3:c", queue_tool.GONE_KEPT - 60)
    store.maintain()
    assert [p["id"] for p in store.processes()] == ["h:1:a", "h:3:c"]
    store.register({**record, "id": "h:3:c", "pid": 3})  # the same id starts again
    assert [p["alive"] for p in store.processes()] == [True, True]


def test_workers_needs_the_key(keyed):
    keyed.get("/workers", status=401)
    body = keyed.get("/workers", headers={"Authorization": "Bearer s3cret-key"}).json
    assert [process["pid"] for process in body["processes"]] == [os.getpid()]


def histogram(families, name):
    """A histogram family's samples checked for consistency: {labels without le:
    (count, sum)}; buckets cumulative, ending at +Inf with the count."""
    series = collections.defaultdict(list)
    totals = {}
    for sample in families[name]:
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        if sample.name == name + "_bucket":
            series[labels].append((float(sample.labels["le"]), sample.value))
        else:
            totals.setdefault(labels, {})[sample.name[len(name) + 1:]] = sample.value
    out = {}
    for labels, buckets in series.items():
        bounds = [bound for bound, _ in buckets]
        counts = [count for _, count in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf
        assert bounds[:-1] == list(queue_tool.Histograms.BUCKETS)
        assert counts == sorted(counts) and counts[-1] == totals[labels]["count"]
        out[dict(labels).get("queue"), dict(labels).get("status")] = (
            totals[labels]["count"], totals[labels]["sum"])
    return out


@both_stores
def test_metrics_histograms_count_this_process_runs_by_queue_and_outcome(make, gate):
    def process(job):
        if job.item == "boom":
            raise RuntimeError("boom")
        if job.item in ("hang", "deaf"):
            job.canceled.wait(30)
        elif job.item == "gated":
            gate.wait(30)
        return job.item
    built = make(process=process, workers=3, retry_delay=0.01)
    client = webtest.TestApp(built)
    tokens = tokens_of(submit(client, [
        {"item": "ok", "valor": 0, "queue": "a"}, {"item": "ok", "valor": 0, "queue": "a"},
        {"item": "boom", "valor": 0, "queue": "b", "retries": 1},
        {"item": "deaf", "valor": 0, "queue": "b", "timeout": 0.05},
        {"item": "hang", "valor": 0, "queue": "c"},
        {"item": "later", "valor": 0, "queue": "d", "delay": 3600}]))
    for token in tokens[:4]:
        assert client.get(f"/check/{token}?wait=10").json["status"] in ("done", "failed")
    wait_until(lambda: client.get(f"/check/{tokens[4]}").json["status"] == "running")
    client.delete(f"/check/{tokens[4]}", status=200)
    gated = tokens_of(submit(client, [{"item": "gated", "valor": 0, "queue": "e"}]))[0]
    wait_until(lambda: client.get(f"/check/{gated}").json["status"] == "running")
    wait_until(lambda: histogram(_families(client), "queue_tool_job_run_seconds").get(
        ("c", "canceled")), what="the canceled run's end")
    families = {}
    samples = scrape(client, families)
    runs = histogram(families, "queue_tool_job_run_seconds")
    assert {labels: count for labels, (count, _) in runs.items()} == {
        ("a", "done"): 2, ("b", "error"): 3, ("c", "canceled"): 1}  # a raise twice, a timeout
    assert runs["b", "error"][1] >= 0.05  # the timeout's run counts its full time
    waits = histogram(families, "queue_tool_job_wait_seconds")
    assert {labels: count for labels, (count, _) in waits.items()} == {
        ("a", None): 2, ("b", None): 3, ("c", None): 1, ("e", None): 1}  # every start
    # The per-queue gauge, from the store: the same from any process on it.
    gauge = {key: value for key, value in samples.items()
             if key.startswith("queue_tool_queue_jobs{")}
    assert gauge['queue_tool_queue_jobs{queue="d",status="queued"}'] == 1
    assert gauge['queue_tool_queue_jobs{queue="e",status="running"}'] == 1
    assert sum(gauge.values()) == 2 and len(gauge) == 2 * 5  # every queue, both states
    other = scrape(webtest.TestApp(make(workers=0)))
    assert {key: value for key, value in other.items()
            if key.startswith("queue_tool_queue_jobs{")} == gauge
    assert not [key for key in other if key.startswith("queue_tool_job_run_seconds")]


def _families(client):
    families = {}
    scrape(client, families)
    return families


@pytest.mark.scale
@both_stores
def test_a_million_jobs_leave_every_page_call_under_a_second(servers, db):
    """Selected with `-m scale` (the default run leaves it out: the filling takes a while)."""
    import bench_queue_tool
    bench_queue_tool.fill_directly(str(db), 1_000_000)
    server = servers("--db", str(db), "--workers", "0")
    took = {}
    for path in ("/", *bench_queue_tool.PAGE_REFRESH, "/queues/q7"):
        began = time.monotonic()
        request = urllib.request.Request(server.url + path)
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            body = response.read()
        took[path] = time.monotonic() - began
        if path == "/health":
            assert json.loads(body)["queued"] == 250_000
        if path == "/queues":
            queues = json.loads(body)["queues"]
            assert len(queues) == 50 and sum(queue["queued"] for queue in queues) == 250_000
    assert max(took.values()) < 1, took
