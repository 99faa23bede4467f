"""Benchmark queue_tool: figures, each beside its reference measured in the same run.

    python bench_queue_tool.py            # the full run (a few minutes on 2 cores)
    python bench_queue_tool.py --quick    # a smoke run with smaller counts
    python bench_queue_tool.py --only submit,check
    python bench_queue_tool.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

Standard library only (plus queue_tool itself, and psycopg for the PostgreSQL rows).
Nothing here asserts: it prints a table of figures, the reference each is compared
with, the ratio, and the target. Servers run as separate processes on 127.0.0.1 and
are stopped at the end. The rows marked [postgres] use a fresh schema in the server
given by --postgres (or QUEUE_TOOL_BENCH_POSTGRES), dropped at the end; without a
server they are left out.
"""

import argparse
import bisect
import collections
import http.client
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wsgiref.util
from pathlib import Path

import queue_tool

HERE = Path(__file__).resolve().parent
BATCH = [{"item": f"item-{n}", "valor": 0} for n in range(100)]
POSTGRES = os.environ.get("QUEUE_TOOL_BENCH_POSTGRES",
                          "postgresql://postgres@127.0.0.1:5432/postgres")


class Databases:
    """Where each measure keeps its jobs: an SQLite file, or a fresh PostgreSQL schema."""

    def __init__(self, workdir, postgres):
        self.workdir, self.postgres, self.schemas = Path(workdir), postgres, []

    def kinds(self):
        return ["sqlite", "postgres"] if self.postgres else ["sqlite"]

    def new(self, name, kind="sqlite"):
        if kind == "sqlite":
            return str(self.workdir / f"{name}.sqlite3")
        import psycopg
        schema = f"bench_{name.replace('-', '_')}_{os.getpid()}_{len(self.schemas)}"
        with psycopg.connect(self.postgres, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        separator = "&" if "?" in self.postgres else "?"
        return f"{self.postgres}{separator}options=-csearch_path%3D{schema}"

    def drop(self):
        if self.schemas:
            import psycopg
            with psycopg.connect(self.postgres, autocommit=True) as connection:
                for schema in self.schemas:
                    connection.execute(f"DROP SCHEMA {schema} CASCADE")


def postgres_reachable(url):
    try:
        import psycopg
        with psycopg.connect(url, connect_timeout=5):
            return True
    except (ImportError, OSError) as exc:
        print(f"no PostgreSQL rows: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - psycopg.Error, without importing it first
        print(f"no PostgreSQL rows: {str(exc).strip()}", file=sys.stderr)
    return False


# -- A trivial app: the reference for the request paths --------------------------

FAKE_TOKEN = "0123456789abcdef" * 2


def trivial_app(environ, start_response):
    """Parses the same body and answers a same-sized JSON, touching no store."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    if body:
        items = json.loads(body)
        payload = {"message": "Itens recebidos para processamento", "processing_items": [
            {"hash": FAKE_TOKEN, "index": n, "item": entry.get("item"), "status": "queued",
             "check": f"/check/{FAKE_TOKEN}"} for n, entry in enumerate(items)]}
        status = "202 Accepted"
    else:
        payload = {"message": "Finalizado", "status": "done", "hash": FAKE_TOKEN,
                   "item": "item-1", "valor": 0, "created_at": "2026-11-28T10:00:00.000Z",
                   "started_at": "2026-11-28T10:00:00.001Z",
                   "finished_at": "2026-11-28T10:00:00.002Z", "attempts": 1}
        status = "200 OK"
    out = json.dumps(payload, ensure_ascii=False).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(out)))])
    return [out]


# -- Helpers --------------------------------------------------------------------

def call(app, method, path, body=b"", query=""):
    """One request straight to a WSGI callable: (status code, body)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/json"}
    wsgiref.util.setup_testing_defaults(environ)
    answer = []
    out = b"".join(app(environ, lambda status, headers, exc=None: answer.append(status)))
    return int(answer[0][:3]), out


def rate(count, seconds):
    return count / seconds if seconds > 0 else float("inf")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_and_threads(pid):
    """RSS, and the threads that stay: the fewest seen over half a second, as the
    thread of the connection that just asked may still be ending."""
    threads = []
    for _ in range(10):
        status = Path(f"/proc/{pid}/status").read_text()
        threads.append(int(re.search(r"Threads:\s+(\d+)", status)[1]))
        time.sleep(0.05)
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024, min(threads)


class Served:
    """A server process on a free loopback port: queue_tool itself or the trivial app."""

    def __init__(self, workdir, *args, trivial=False, worker=False, ready=True):
        self.log = Path(workdir) / f"served-{time.monotonic_ns()}.log"
        if trivial:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-trivial"]
        elif worker:
            command = [sys.executable, str(HERE / "queue_tool.py"), "worker", *args]
        else:
            command = [sys.executable, str(HERE / "queue_tool.py"), "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(workdir)])}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=workdir, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while ready:  # (not ready: the caller watches the store, not the log)
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+)|working \(db",
                              self.log.read_text())
            if found:
                self.port = found[1] and int(found[1])
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log.read_text()}")
            time.sleep(0.02)

    def request(self, method, path, payload=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = None if payload is None else json.dumps(payload).encode()
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_trivial():
    """--serve-trivial: the trivial app under queue_tool's own threaded server."""
    server = queue_tool.Server("127.0.0.1", 0, trivial_app)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.2)


def check_paths(db, count):
    """/check/<token> paths of `count` finished valor-0 jobs in `db`."""
    loader = queue_tool.make_app(db=db, workers=16)
    try:
        return [f"/check/{token}" for token in finished_tokens(loader, count)]
    finally:
        loader.close(grace=0)


def finished_tokens(app, count):
    """Submit `count` valor-0 jobs to `app` and wait until all are done."""
    tokens = []
    for start in range(0, count, 100):
        _status, out = call(app, "POST", "/api", json.dumps(BATCH[:min(100, count - start)]).encode())
        tokens += [e["hash"] for e in json.loads(out)["processing_items"]]
    for token in tokens:
        call(app, "GET", f"/check/{token}", query="wait=30")
    return tokens


# -- The measures -----------------------------------------------------------------

def side_by_side(ours, reference, rounds):
    """The best rate of each over alternating rounds, so machine noise hits both alike."""
    best = [0.0, 0.0]
    for _ in range(rounds):
        for n, run in enumerate((ours, reference)):
            best[n] = max(best[n], run())
    return best


def timed_rate(count, work):
    began = time.perf_counter()
    work()
    return rate(count, time.perf_counter() - began)


def bench_submit(dbs, quick):
    """1. Accepted items per second, 100-item batches straight to the WSGI callable."""
    rows = []
    for kind in dbs.kinds():
        ours, reference = submit_rates(dbs.new("submit", kind), quick)
        rows.append((f"submit, in-process, {kind} (items/s)", ours, reference,
                     "ratio printed; >= 20,000/s", ours >= 20_000))
    return rows


def submit_rates(db, quick):
    """(ours, the trivial app's) items per second, best of alternating rounds."""
    app = queue_tool.make_app(db=db, workers=0, max_queued=10_000_000)
    body = json.dumps(BATCH).encode()
    batches = 20 if quick else 100

    def send(target):
        for _ in range(batches):
            assert call(target, "POST", "/api", body)[0] == 202
    try:
        send(app)  # warm up
        return side_by_side(lambda: timed_rate(batches * 100, lambda: send(app)),
                            lambda: timed_rate(batches * 100, lambda: send(trivial_app)),
                            rounds=3 if quick else 5)
    finally:
        app.close(grace=0)


def bench_check(dbs, quick):
    """2. GET /check/<token> calls per second for finished jobs, in-process."""
    app = queue_tool.make_app(db=dbs.new("check"), workers=16)
    try:
        tokens = finished_tokens(app, 1000)
        picks = [f"/check/{random.choice(tokens)}" for _ in range(2000 if quick else 5000)]

        def check(target):
            for path in picks:
                call(target, "GET", path)
        ours, reference = side_by_side(lambda: timed_rate(len(picks), lambda: check(app)),
                                       lambda: timed_rate(len(picks),
                                                          lambda: check(trivial_app)),
                                       rounds=3 if quick else 5)
    finally:
        app.close(grace=0)
    return [("check, in-process (calls/s)", ours, reference, ">= 0.5 of reference",
             ours >= 0.5 * reference)]


def http_load(served, paths, clients, seconds):
    """Sequential latencies, then throughput from `clients` threads for `seconds`."""
    for path in paths[:50]:
        served.request("GET", path)  # warm up the process
    latencies = []
    for path in (paths * 2)[:1000]:
        began = time.perf_counter()
        served.request("GET", path)
        latencies.append(time.perf_counter() - began)
    return hammer(lambda: served.request("GET", random.choice(paths)), clients, seconds), latencies


def hammer(send, clients, seconds):
    """Calls of send() per second from `clients` threads calling it for `seconds`."""
    done, stop_at = [0] * clients, time.perf_counter() + seconds

    def client(n):
        while time.perf_counter() < stop_at:
            send()
            done[n] += 1
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rate(sum(done), time.perf_counter() - began)


def bench_http(dbs, quick):
    """3. Check requests over HTTP on the threaded server of `python queue_tool.py`."""
    workdir, db = dbs.workdir, dbs.new("http")
    paths = check_paths(db, 500)
    seconds = 2 if quick else 8
    served = Served(workdir, "--db", str(db), "--workers", "16")
    try:
        ours, ours_latency = http_load(served, paths, 4, seconds)
    finally:
        served.stop()
    trivial = Served(workdir, trivial=True)
    try:
        reference, reference_latency = http_load(trivial, paths, 4, seconds)
    finally:
        trivial.stop()
    p50, p99 = (percentile(ours_latency, 0.5), percentile(ours_latency, 0.99))
    rp50, rp99 = (percentile(reference_latency, 0.5), percentile(reference_latency, 0.99))
    return [("check over HTTP, 4 clients (req/s)", ours, reference, "ratio printed", None),
            ("check over HTTP, p50 latency (ms)", p50 * 1e3, rp50 * 1e3, "ratio printed", None),
            ("check over HTTP, p99 latency (ms)", p99 * 1e3, rp99 * 1e3, "ratio printed", None)]


def bench_burst(dbs, quick):
    """3b. GET /check latency with 32 connections at once on the built-in server, against
    the trivial app on the same server class: the p99 shows a listen backlog too short."""
    workdir, db = dbs.workdir, dbs.new("burst")
    paths = check_paths(db, 200)
    requests = 40 if quick else 150
    figures = []
    for served in (Served(workdir, "--db", str(db), "--workers", "16"),
                   Served(workdir, trivial=True)):
        try:
            latencies = burst(served, paths, 32, requests)
        finally:
            served.stop()
        figures.append(percentile(latencies, 0.99) * 1e3)
    return [("check p99, 32 connections at once, built-in server (ms)", figures[0], figures[1],
             "<= 3 x the trivial app's p99", figures[0] <= 3 * figures[1])]


def burst(served, paths, clients, requests):
    """`clients` threads, each sending `requests` GETs, a new connection each time."""
    latencies, go = [], threading.Event()

    def client():
        go.wait()
        for _ in range(requests):
            began = time.perf_counter()
            served.request("GET", random.choice(paths))
            latencies.append(time.perf_counter() - began)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()
    return latencies


def bench_single(dbs, quick):
    """3c. One job per request from one client over HTTP, on one kept-alive connection,
    the built-in server with its workers running, against the trivial app."""
    seconds = 2 if quick else 6
    body = json.dumps([{"item": "one", "valor": 0}]).encode()
    headers = {"Content-Type": "application/json"}
    figures = []
    for served in (Served(dbs.workdir, "--db", dbs.new("single"), "--workers", "16"),
                   Served(dbs.workdir, trivial=True)):
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        try:
            def send(connection=connection):
                connection.request("POST", "/api", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                assert response.status == 202, response.status
            for _ in range(50):
                send()  # warm up
            done, stop_at = 0, time.perf_counter() + seconds
            began = time.perf_counter()
            while time.perf_counter() < stop_at:
                send()
                done += 1
            figures.append(rate(done, time.perf_counter() - began))
        finally:
            connection.close()
            served.stop()
    return [("one job per request, one client, built-in server (jobs/s)", figures[0],
             figures[1], ">= 3,000", figures[0] >= 3000)]


class Gunicorn(Served):
    """gunicorn (gthread) serving `app` on a free loopback port; None if not installed."""

    def __init__(self, workdir, app, env, workers=2, threads=16, core=None):
        program = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
        self.log = Path(workdir) / f"gunicorn-{time.monotonic_ns()}.log"
        pin = [] if core is None else ["taskset", "-c", str(core)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*pin, program, "-w", str(workers), "-k", "gthread", "--threads", str(threads),
                 "--backlog", "2048", "-b", "127.0.0.1:0", app], cwd=workdir, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(HERE), **env})
        deadline = time.monotonic() + 30
        while True:
            text = self.log.read_text()
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            if found and text.count("Booting worker") >= workers:
                self.port = int(found[1])
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{text}")
            time.sleep(0.05)


SEED_ITEMS_PER_SECOND = 1830  # the original Flask service, as issue 12 measured it here


def bench_gunicorn(dbs, quick):
    """9. Under gunicorn (2 gthread workers, 16 threads each): GET /check against a bare
    WSGI app on the same server, and 100-item batches from 32 connections while the
    service's workers drain them."""
    if shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None:
        print("no gunicorn rows: gunicorn is not installed", file=sys.stderr)
        return []
    db, rounds = dbs.new("gunicorn"), 1 if quick else 9
    paths = check_paths(db, 500)
    env = {"QUEUE_TOOL_DB": db, "QUEUE_TOOL_WORKERS": "8", "QUEUE_TOOL_MAX_QUEUED": "10000000"}
    ours = Gunicorn(dbs.workdir, "queue_tool:app", env)
    try:
        bare = Gunicorn(dbs.workdir, "bench_queue_tool:trivial_app", env)
        try:
            # Both serve at once and take turns of a second, so the machine's noise
            # (about 15% between runs here) hits both alike; the median turn counts.
            turns = [[], []]
            for _ in range(rounds):
                for n, served in enumerate((ours, bare)):
                    turns[n].append(http_load(served, paths, 4, 1)[0])
            checks = [statistics.median(figures) for figures in turns]
            # The bare app's batches first: ours go on draining after their turn.
            batches = [0.0, 100 * posts(bare, 32, 3 if quick else 6)]
        finally:
            bare.stop()
        batches[0] = 100 * posts(ours, 32, 3 if quick else 6)
    finally:
        ours.stop()
    return [("check under gunicorn, 4 clients (req/s)", checks[0], checks[1],
             ">= 0.9 of the bare app", checks[0] >= 0.9 * checks[1]),
            ("100-item batches under gunicorn, 32 connections (items/s)", batches[0],
             batches[1], f">= 50 x the seed's {SEED_ITEMS_PER_SECOND:,}",
             batches[0] >= 50 * SEED_ITEMS_PER_SECOND)]


WRK_POST = """wrk.method, wrk.path = "POST", "/api"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [=[{body}]=]
"""
WRK_PATHS = """local paths, n = {{{paths}}}, 0
request = function() n = n % #paths + 1 return wrk.format("GET", paths[n]) end
"""


def wrk(workdir, port, seconds, script, connections=32):
    """Requests/s that wrk (on the second core) gets from 127.0.0.1:`port` over
    `connections` kept-alive connections, running the Lua `script`; every answer
    must be a 2xx."""
    lua = Path(workdir) / f"wrk-{time.monotonic_ns()}.lua"
    lua.write_text(script)
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t", "2", "-c", str(connections),
                          "-d", f"{seconds}s", "-s", str(lua), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), int(
        re.search(r"(\d+) requests in", out)[1])


def one_job_clients(served, clients, each):
    """`clients` threads, each sending `each` one-job submits on its own kept-alive
    connection, all at once."""
    body = json.dumps([{"item": "one", "valor": 0}]).encode()
    start = threading.Barrier(clients)

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        start.wait()
        for _ in range(each):
            connection.request("POST", "/api", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            assert response.status == 202, response.status
        connection.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def bench_web(dbs, quick):
    """17. The web tier as issue 21 measured it: `gunicorn -w 1 -k gthread --threads 8`
    pinned to one core with QUEUE_TOOL_WORKERS=0, wrk on the other core with 32
    kept-alive connections, against the trivial app under the same gunicorn: one job
    per request, 100-item batches, GET /check. Then the built-in server: disk syncs
    per submit from 32 concurrent one-job clients (SQLite: the process's fsync calls
    counted by strace; PostgreSQL: pg_stat_wal.wal_sync), and 10,000 idle connections
    held open (threads and RSS)."""
    rows = []
    seconds = 2 if quick else 5
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("no gunicorn/wrk rows: wrk or taskset is missing", file=sys.stderr)
    else:
        db = dbs.new("web")
        paths = check_paths(db, 500)
        env = {"QUEUE_TOOL_DB": db, "QUEUE_TOOL_WORKERS": "0",
               "QUEUE_TOOL_MAX_QUEUED": "100000000"}
        figures, store = {}, queue_tool.open_store(db)
        for name, app in (("ours", "queue_tool:app"), ("trivial", "bench_queue_tool:trivial_app")):
            served = Gunicorn(dbs.workdir, app, env, workers=1, threads=8, core=0)
            try:
                submitted = store.counters()["submitted"]
                one, sent_one = wrk(dbs.workdir, served.port, seconds, WRK_POST.format(
                    body=json.dumps([{"item": "one", "valor": 0}])))
                batch, sent_batch = wrk(dbs.workdir, served.port, seconds, WRK_POST.format(
                    body=json.dumps(BATCH)))
                check, _ = wrk(dbs.workdir, served.port, seconds, WRK_PATHS.format(
                    paths=", ".join(f'"{path}"' for path in paths)))
                figures[name] = [one, 100 * batch, check]
                if name == "ours":  # every answer was a submit the store holds (and
                    # those cut off at the end: sent, held, their answers never read)
                    held = store.counters()["submitted"] - submitted - sent_one - 100 * sent_batch
                    assert 0 <= held <= 32 + 32 * 100, held
            finally:
                served.stop()
        store.close()
        (one, batch, check), (one_ref, batch_ref, check_ref) = figures["ours"], figures["trivial"]
        where = "32 connections, gunicorn on one core"
        rows += [(f"one job per request, {where} (jobs/s; ref: trivial app)", one, one_ref,
                  ">= 0.7 of reference", one >= 0.7 * one_ref),
                 (f"100-item batches, {where} (items/s; ref: trivial app)", batch, batch_ref,
                  ">= 100,000", batch >= 100_000),
                 (f"GET /check, {where} (req/s; ref: trivial app)", check, check_ref,
                  ">= 0.9 of reference", check >= 0.9 * check_ref)]
    clients, each = 32, 20 if quick else 100
    for kind in dbs.kinds():
        db = dbs.new("group", kind)
        served = Served(dbs.workdir, "--db", db, "--workers", "0")
        one_job_clients(served, clients, 5)  # warm up: the schema, the threads
        if kind == "sqlite":
            counted = strace_fsyncs(served.process.pid)
        else:
            before = postgres_wal_syncs(db)
        one_job_clients(served, clients, each)
        if kind == "sqlite":
            served.stop()
            syncs = None if counted is None else counted()
        else:
            syncs = postgres_wal_syncs(db) - before
            served.stop()
        where = "strace" if kind == "sqlite" else "pg_stat_wal.wal_sync"
        per = None if syncs is None else syncs / (clients * each)
        name = f"disk syncs per submit, 32 concurrent one-job clients, {kind} ({where})"
        rows.append((name, per, None, "<= 0.1", None if per is None else per <= 0.1))
    rows += idle_connections(dbs, 2000 if quick else 10_000)
    return rows


def idle_connections(dbs, count):
    """The built-in server (default settings but --max-connections) holding `count`
    silent connections: its threads and RSS meanwhile."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 1000:
        print(f"no idle-connection rows: the hard file limit is {hard}", file=sys.stderr)
        return []
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    served = Served(dbs.workdir, "--db", dbs.new("idle"), "--max-connections",
                    str(count + 2000))
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", served.port)))
        # Each is accepted and held: then /health still answers.
        assert served.request("GET", "/health")[0] == 200
        rss, threads = rss_and_threads(served.process.pid)
    finally:
        for sock in sockets:
            sock.close()
        served.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limit = queue_tool.REQUEST_THREADS + 32
    return [(f"{count:,} idle connections, built-in server: threads (16 workers)", threads,
             None, f"<= {limit} (the pool + 32)", threads <= limit),
            (f"{count:,} idle connections, built-in server: RSS (MiB)", rss / 2**20, None,
             "<= 256", rss <= 256 * 2**20)]


def posts(served, clients, seconds):
    """Batches of BATCH accepted per second from `clients` threads for `seconds`."""
    def send():
        status, _ = served.request("POST", "/api", BATCH)
        assert status == 202, status
    return hammer(send, clients, seconds)


def bench_dispatch(dbs, quick):
    """4. From the 202 to `done` for valor-0 jobs on an idle service: p50 and p99."""
    rows = []
    for kind in dbs.kinds():
        app = queue_tool.make_app(db=dbs.new("dispatch", kind), workers=16)
        body = json.dumps([{"item": "now", "valor": 0}]).encode()
        latencies = []
        try:
            app.start()
            time.sleep(0.2)  # let every worker reach its idle wait
            for _ in range(50 if quick else 300):
                _status, out = call(app, "POST", "/api", body)
                accepted = time.time()
                token = json.loads(out)["processing_items"][0]["hash"]
                call(app, "GET", f"/check/{token}", query="wait=5")
                latencies.append(app.store.get(token)["finished_at"] - accepted)
        finally:
            app.close(grace=0)
        p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
        rows += [(f"dispatch 202 -> done, {kind}, p50 (ms)", p50, None, "<= 5 ms", p50 <= 5),
                 (f"dispatch 202 -> done, {kind}, p99 (ms)", p99, None, "<= 50 ms",
                  p99 <= 50)]
    return rows


def bench_dispatch_across(dbs, quick):
    """4b. The same from a --workers 0 front to a `queue-tool worker` process:
    created_at -> started_at and -> finished_at, both on the store's clock."""
    rows = []
    for kind in dbs.kinds():
        db = dbs.new("across", kind)
        front = queue_tool.make_app(db=db, workers=0)
        worker = Served(dbs.workdir, "--db", db, "--workers", "4", worker=True)
        body = json.dumps([{"item": "there", "valor": 0}]).encode()
        starts, dones = [], []
        try:
            time.sleep(0.5)  # let its workers reach their idle wait
            for _ in range(30 if quick else 200):
                _status, out = call(front, "POST", "/api", body)
                token = json.loads(out)["processing_items"][0]["hash"]
                call(front, "GET", f"/check/{token}", query="wait=5")
                row = front.store.get(token)
                starts.append(row["started_at"] - row["created_at"])
                dones.append(row["finished_at"] - row["created_at"])
        finally:
            worker.stop()
            front.close(grace=0)
        for name, values in (("start", starts), ("done", dones)):
            p50, p99 = percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3
            rows += [(f"dispatch across processes, {kind}, submit -> {name} p50 (ms)", p50,
                      None, "ratio printed", None),
                     (f"dispatch across processes, {kind}, submit -> {name} p99 (ms)", p99,
                      None, "<= 50 ms", p99 <= 50)]
    return rows


PEERS = {"sqlite": "Huey 3,464", "postgres": "pgqueuer 2,977, procrastinate 1,049"}


def bench_process(dbs, quick):
    """8. Processing throughput: 10,000 queued valor-0 jobs, then 16 workers start; and
    the disk syncs per job meanwhile. Each run is a fresh process, as a service is: in
    this one, what the other measures left in memory would slow the collector."""
    count, runs = (2000, 1) if quick else (10_000, 3)
    rows = []
    for kind in dbs.kinds():
        # The median of three runs: a checkpoint or an autovacuum of PostgreSQL's that
        # falls within a one-second run moves it by a quarter.
        results = sorted(process_in_child(dbs.new(f"process-{n}", kind), kind, count)
                         for n in range(runs))
        seconds, commits, syncs = results[len(results) // 2]
        if kind == "sqlite":  # an untimed second run: tracing slows every system call
            syncs = process_in_child(dbs.new("process-traced"), kind, count, trace=True)[2]
        goal = 10_000 if kind == "sqlite" else 9_000
        where = "fsync/fdatasync calls, strace" if kind == "sqlite" else "pg_stat_wal.wal_sync"
        rows += [(f"process {count:,} queued jobs, 16 workers, {kind} (jobs/s)",
                  rate(count, seconds), None,
                  f">= {goal:,} (peers here: {PEERS[kind]})", rate(count, seconds) >= goal),
                 (f"commits per job while processing, {kind}", commits / count,
                  None, "far below 1 (was 2: a claim and a finish)", commits / count < 0.5),
                 (f"disk syncs per job while processing, {kind} ({where})",
                  None if syncs is None else syncs / count, None, "far below 1",
                  None if syncs is None else syncs / count < 0.5)]
    return rows


def process_in_child(db, kind, count, trace=False, queue=None, workers=16):
    """process_queued() in a child process: (seconds, commits, disk syncs or None).
    With `trace`, strace counts the child's fsync calls once its queue is filled;
    `queue` is a merge patch of the queue's settings, applied before the run."""
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--process-run",
         json.dumps([db, kind, count, queue, workers])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    tracer = None
    try:
        assert child.stdout.readline().strip() == "filled"
        if trace:
            tracer = strace_fsyncs(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        seconds, commits, syncs = json.loads(child.stdout.readline())
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if trace:
        syncs = None if tracer is None else tracer()
    return seconds, commits, syncs


def process_child(spec):
    """--process-run: fill the queue, wait for a line on stdin, then time the run."""
    db, kind, count, queue, workers = json.loads(spec)
    fill(db, count, queue)
    print("filled", flush=True)
    sys.stdin.readline()
    app = queue_tool.make_app(db=db, workers=workers, max_queued=count + 1)
    commits = counted(app.store, "finish_and_claim")
    wal_syncs = postgres_wal_syncs(db) if kind == "postgres" else None
    try:
        began = time.perf_counter()
        app.start()
        while app.store.counters()["finished_done"] < count:
            time.sleep(0.01)
        seconds = time.perf_counter() - began
    finally:
        app.close(grace=0)
    if wal_syncs is not None:
        wal_syncs = postgres_wal_syncs(db) - wal_syncs
    print(json.dumps([seconds, commits[0], wal_syncs]), flush=True)
    return 0


def fill(db, count, queue=None):
    """Queue `count` valor-0 jobs in `db`, in 100-item batches; `queue` is a merge patch
    of the default queue's settings to apply."""
    filler = queue_tool.make_app(db=db, workers=0, max_queued=count + 1)
    body = json.dumps(BATCH).encode()
    for _ in range(count // 100):
        assert call(filler, "POST", "/api", body)[0] == 202
    if queue:
        filler.store.set_queue("default", lambda before: queue_tool.merge_queue(before, queue))
    filler.close(grace=0)


def served_rate(db, count, served):
    """Jobs/s of the `served` process until `count` jobs are done, from the first start
    to the last end as the store recorded them; the process is stopped after."""
    store = queue_tool.open_store(db)
    try:
        while store.counters()["finished_done"] < count:
            time.sleep(0.05)
    finally:
        served.stop()
        store.close()
    return rate(count, max(job_times(db, "finished_at")) - min(job_times(db, "started_at")))


def job_times(db, column):
    """The `column` (started_at, finished_at) of every job, epoch seconds, sorted."""
    if db.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(db) as connection:
            rows = connection.execute(f"SELECT extract(epoch FROM {column})::float8"
                                      " FROM queue_tool_jobs").fetchall()
    else:
        import sqlite3
        with sqlite3.connect(db) as connection:
            rows = connection.execute(f"SELECT {column} FROM jobs").fetchall()
    return sorted(value for (value,) in rows)


# The peers, as their users run them: Huey's consumer and pgqueuer's CLI, each on a
# store holding the jobs already, with a no-op task that notes the first start and
# the last end (the clock the served rows read from the store).
PEER_MODULE = '''
import os, threading, time
COUNT, OUT = int(os.environ["PEER_COUNT"]), os.environ["PEER_OUT"]
_lock, _seen = threading.Lock(), []

def ran(started):
    with _lock:
        _seen.append(started)
        if len(_seen) == COUNT:
            with open(OUT + ".tmp", "w") as out:
                out.write(f"{min(_seen)} {time.time()}")
            os.replace(OUT + ".tmp", OUT)

if os.environ.get("PEER") == "huey":
    from huey import SqliteHuey
    huey = SqliteHuey(filename=os.environ["PEER_DB"])

    @huey.task()
    def noop():
        ran(time.time())
else:
    async def main():
        import psycopg
        from pgqueuer import PgQueuer, PsycopgDriver
        connection = await psycopg.AsyncConnection.connect(os.environ["PEER_DB"], autocommit=True)
        pgq = PgQueuer(PsycopgDriver(connection))

        @pgq.entrypoint("noop")
        async def noop(job):
            ran(time.time())
        return pgq

    async def run():
        await (await main()).run()
'''


def peer_rate(workdir, peer, db, count):
    """Jobs/s of a peer (huey: an SQLite file; pgqueuer: a PostgreSQL URL), from the
    first start to the last end of `count` no-op jobs queued before it starts."""
    (Path(workdir) / "peer_jobs.py").write_text(PEER_MODULE)
    out = Path(workdir) / f"peer-{peer}-{time.monotonic_ns()}.txt"
    env = {**os.environ, "PYTHONPATH": str(workdir), "PEER": peer, "PEER_DB": db,
           "PEER_COUNT": str(count), "PEER_OUT": str(out), "PGDSN": db}
    bin_dir = Path(sys.executable).parent
    if peer == "huey":
        fill_code = """if True:
            import os, peer_jobs
            huey, count = peer_jobs.huey, int(os.environ["PEER_COUNT"])
            rows = [(huey.storage.name, huey.storage.to_blob(huey.serialize_task(
                peer_jobs.noop.s())), 0) for _ in range(count)]
            with huey.storage.db(commit=True) as cursor:
                cursor.executemany("insert into task (queue, data, priority) values (?, ?, ?)", rows)
            """
        command = [str(bin_dir / "huey_consumer"), "peer_jobs.huey", "-w", "16", "-k", "thread"]
    else:
        fill_code = """if True:
            import asyncio, os, psycopg
            from pgqueuer import PsycopgDriver, Queries
            async def fill():
                connection = await psycopg.AsyncConnection.connect(
                    os.environ["PEER_DB"], autocommit=True)
                queries, left = Queries(PsycopgDriver(connection)), int(os.environ["PEER_COUNT"])
                await queries.install()
                while left:
                    n = min(left, 10_000)
                    await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
                    left -= n
            asyncio.run(fill())
            """
        # As its README runs it from Python (its `pgq run` fails to start in 1.6.0: its
        # default --log-level is a str where its logging set-up wants an enum).
        run = "import asyncio, peer_jobs\nasyncio.run(peer_jobs.run())"
        command = [sys.executable, "-c", run]
    subprocess.run([sys.executable, "-c", fill_code], env=env, cwd=workdir, check=True)
    log = Path(workdir) / f"{out.name}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=workdir, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not out.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{peer} did not finish:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT if peer == "huey" else signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    first, last = map(float, out.read_text().split())
    return rate(count, last - first)


PEERS_SERVED = {"sqlite": "huey", "postgres": "pgqueuer"}


def bench_served(dbs, quick):
    """16. Processing as users run it: a store holding 100,000 queued no-op jobs, then
    `python queue_tool.py --workers 16` started with its default settings (logging
    at info); jobs/s from the first job's start to the last one's end, the store's
    clock. Beside it, the peer on the same store kind, started as its users start it
    (`huey_consumer -w 16 -k thread`; pgqueuer's QueueManager.run() with its defaults,
    the entrypoint unlimited: with concurrency_limit=16, pgqueuer 1.6.0 ran 9 jobs/s
    here), timed the same way by its own task."""
    count = 10_000 if quick else 100_000
    goals = {"sqlite": 30_000, "postgres": 15_000}
    rows = []
    for kind in dbs.kinds():
        db = dbs.new("served", kind)
        fill(db, count)
        ours = served_rate(db, count, Served(
            dbs.workdir, "--db", db, "--workers", "16", "--max-queued", str(count + 1),
            ready=False))
        peer = PEERS_SERVED[kind]
        theirs = peer_rate(dbs.workdir, peer, dbs.new(f"peer-{peer}", kind), count)
        name = f"process {count:,} queued jobs served, 16 workers, {kind} (jobs/s; ref: {peer})"
        rows.append((name, ours, theirs,
                     f">= {goals[kind]:,} and >= 5x reference",
                     ours >= goals[kind] and ours >= 5 * theirs))
    return rows


def bench_limits(dbs, quick):
    """12. Flow control: 10,000 queued valor-0 jobs processed by 16 workers in a queue
    with `concurrency` 8, against the same queue without a limit (run in turns, the
    median of three each), and against 8 workers without a limit (as many running
    at once: the limit's own cost); and with `rate` 1,000 a second: the starts in
    each whole second from the first (their mean and the most in any sliding second)."""
    count, runs = (2000, 1) if quick else (10_000, 3)
    rows = []
    for kind in dbs.kinds():
        plain, limited, eight = [], [], []
        for n in range(runs):
            plain.append(process_in_child(dbs.new(f"plain-{n}", kind), kind, count)[0])
            limited.append(process_in_child(dbs.new(f"limited-{n}", kind), kind, count,
                                            queue={"concurrency": 8})[0])
            eight.append(process_in_child(dbs.new(f"eight-{n}", kind), kind, count,
                                          workers=8)[0])
        ours, reference, as_many = (rate(count, sorted(times)[len(times) // 2])
                                    for times in (limited, plain, eight))
        db = dbs.new("rated", kind)
        process_in_child(db, kind, count, queue={"rate": {"limit": 1000, "per": 1}})
        starts = job_times(db, "started_at")
        whole = int(starts[-1] - starts[0])
        per_second = collections.Counter(int(start - starts[0]) for start in starts)
        mean = sum(per_second[k] for k in range(whole)) / whole
        most = max(bisect.bisect_left(starts, start + 1) - n for n, start in enumerate(starts))
        rows += [(f"limits, {kind}, concurrency 8 (jobs/s; ref: no limit)", ours, reference,
                  ">= 0.8 of reference", ours >= 0.8 * reference),
                 (f"limits, {kind}, concurrency 8 (jobs/s; ref: no limit, 8 workers)", ours,
                  as_many, ">= 0.8 of reference", ours >= 0.8 * as_many),
                 (f"limits, {kind}, rate 1,000/s: starts per whole second", mean, None,
                  "within 5% of 1,000", abs(mean - 1000) <= 50),
                 (f"limits, {kind}, rate 1,000/s: most starts in any second", most, None,
                  "<= 1,000", most <= 1000)]
    return rows


SPIN = """
def spin(job):
    total = 0
    for n in range({rounds}):  # pure Python, holding the GIL: about 5 ms
        total += n * n
    return total
"""


def bench_cpu(dbs, quick):
    """13. CPU-bound jobs (a processor spinning ~5 ms of pure Python): jobs/s of
    `queue-tool worker --processes 2 --workers 1` against `--workers 2` in one
    process, from the first start to the last end (SQLite)."""
    count = 200 if quick else 1000
    rounds, began = 10_000, time.perf_counter()
    sum(n * n for n in range(rounds))
    rounds = int(rounds * 0.005 / (time.perf_counter() - began))
    (dbs.workdir / "spinning.py").write_text(SPIN.format(rounds=rounds))
    figures = []
    for args in (["--processes", "2", "--workers", "1"], ["--workers", "2"]):
        db = dbs.new(f"cpu-{len(figures)}")
        fill(db, count)
        figures.append(served_rate(db, count, Served(
            dbs.workdir, "--db", db, "--process", "spinning:spin", *args, worker=True)))
    ours, reference = figures
    return [("cpu-bound jobs, --processes 2 (jobs/s; ref: --workers 2, one process)", ours,
             reference, ">= 1.7x reference", ours >= 1.7 * reference)]


def bench_logs(dbs, quick):
    """14. The cost of logging: 100,000 queued valor-0 jobs processed by a served
    `python queue_tool.py --workers 16` at the default level (info) in text and in
    JSON, against the same with logging off (--log-level error); jobs/s from the first
    start to the last end, as the store recorded them."""
    count = 10_000 if quick else 100_000
    rows = []
    for kind in dbs.kinds():
        figures = {}
        for name, args in (("off", ["--log-level", "error"]), ("text", []),
                           ("json", ["--log-format", "json"])):
            db = dbs.new(f"logs-{name}", kind)
            fill(db, count)
            figures[name] = served_rate(db, count, Served(
                dbs.workdir, "--db", db, "--workers", "16", "--max-queued", str(count + 1),
                *args, ready=False))
        rows += [(f"logs, {kind}, {count:,} jobs at info, {name} (jobs/s; ref: logging off)",
                  figures[name], figures["off"], ">= 0.9 of reference",
                  figures[name] >= 0.9 * figures["off"]) for name in ("text", "json")]
    return rows


def fill_directly(db, count, queues=50):
    """Store `count` jobs in `db` straight in SQL (a million in seconds, where submits
    take minutes): spread over `queues` queues, a quarter queued, 1% failed, the rest
    done, with the counters to match. For the measures and tests at scale."""
    queue_tool.open_store(db).close()  # the schema
    shares = {"queued": count // 4, "failed": count // 100}
    shares["done"] = count - shares["queued"] - shares["failed"]
    if db.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(db) as connection:
            connection.execute(
                """INSERT INTO queue_tool_jobs (token, item, valor, status, queue, owner,
                    attempts, started_at, finished_at, error)
                SELECT md5(random()::text || i), 'item-' || i, 0,
                    CASE WHEN mod(i, 100) < 25 THEN 'queued' WHEN mod(i, 100) = 25 THEN 'failed'
                         ELSE 'done' END, 'q' || mod(i, %(queues)s),
                    CASE WHEN mod(i, 100) >= 25 THEN 'bench:1:a' END,
                    CASE WHEN mod(i, 100) >= 25 THEN 1 ELSE 0 END,
                    CASE WHEN mod(i, 100) >= 25 THEN now() END,
                    CASE WHEN mod(i, 100) >= 25 THEN now() END,
                    CASE WHEN mod(i, 100) = 25 THEN 'it failed' END
                FROM generate_series(0, %(count)s - 1) AS i""",
                {"queues": queues, "count": count})
            connection.execute("""INSERT INTO queue_tool_queues (name)
                SELECT DISTINCT queue FROM queue_tool_jobs ON CONFLICT DO NOTHING""")
            statuses = ("queued", "failed", "done")
            connection.execute("""UPDATE queue_tool_counters SET value = value + (
                    SELECT count(*) FROM queue_tool_jobs WHERE status = %s)
                WHERE name = %s AND shard = 0""", ("queued", "queued"))
            for status in statuses[1:]:
                connection.execute("""UPDATE queue_tool_counters SET value = value + (
                        SELECT count(*) FROM queue_tool_jobs WHERE status = %s)
                    WHERE name = %s AND shard = 0""", (status, "finished_" + status))
            connection.execute("""UPDATE queue_tool_counters SET value = value + %s
                WHERE name = 'submitted' AND shard = 0""", (count,))
            connection.execute("ANALYZE queue_tool_jobs")
        return
    import sqlite3
    with sqlite3.connect(db) as connection:
        now = time.time()
        connection.execute(
            """WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :count - 1)
            INSERT INTO jobs (token, item, valor, status, created_at, run_at, queue, owner,
                attempts, started_at, finished_at, error)
            SELECT lower(hex(randomblob(16))), 'item-' || i, 0,
                CASE WHEN i % 100 < 25 THEN 'queued' WHEN i % 100 = 25 THEN 'failed'
                     ELSE 'done' END, :now, :now, 'q' || (i % :queues),
                CASE WHEN i % 100 >= 25 THEN 'bench:1:a' END,
                CASE WHEN i % 100 >= 25 THEN 1 ELSE 0 END,
                CASE WHEN i % 100 >= 25 THEN :now END, CASE WHEN i % 100 >= 25 THEN :now END,
                CASE WHEN i % 100 = 25 THEN 'it failed' END
            FROM n""", {"count": count, "now": now, "queues": queues})
        connection.execute("INSERT OR IGNORE INTO queues (name) SELECT DISTINCT queue FROM jobs")
        for name, status in (("queued", "queued"), ("finished_failed", "failed"),
                             ("finished_done", "done")):
            connection.execute("""UPDATE counters SET value = value + (
                SELECT COUNT(*) FROM jobs WHERE status = ?) WHERE name = ?""", (status, name))
        connection.execute("UPDATE counters SET value = value + ? WHERE name = 'submitted'",
                           (count,))


# What the page asks for each second (as its refresh does), and once each for timing.
PAGE_REFRESH = ("/health", "/metrics", "/jobs?limit=20", "/workers", "/queues", "/schedules",
                "/jobs?status=failed&limit=10")


def busy_cores_during(seconds, work):
    """The machine's busy CPU (in cores) while work() runs for `seconds`, from /proc/stat:
    the served process and the database server alike."""
    def busy():
        fields = [int(n) for n in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    began, at = busy(), time.monotonic()
    work(seconds)
    return (busy() - began) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - at)


def bench_fleet(dbs, quick):
    """15. At scale: with 1,000,000 jobs in 50 queues stored, the answer time of /metrics
    (and of every call the page makes); and the machine's CPU while one page refreshes
    each second, against the same time idle."""
    count = 100_000 if quick else 1_000_000
    rows = []
    for kind in dbs.kinds():
        db = dbs.new("fleet", kind)
        fill_directly(db, count)
        served = Served(dbs.workdir, "--db", db, "--workers", "0")
        try:
            times = {}
            for path in ("/", *PAGE_REFRESH):
                began = time.perf_counter()
                assert served.request("GET", path)[0] == 200
                times[path] = time.perf_counter() - began
            slowest = max(times, key=times.get)

            def refresh(seconds, served=served):
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    began = time.monotonic()
                    for path in PAGE_REFRESH:
                        served.request("GET", path)
                    time.sleep(max(0.0, 1 - (time.monotonic() - began)))
            window = 3 if quick else 10
            idle = busy_cores_during(window, time.sleep)
            polled = busy_cores_during(window, refresh)
        finally:
            served.stop()
        rows += [(f"/metrics at {count:,} jobs in 50 queues, {kind} (ms)",
                  times["/metrics"] * 1e3, None, "<= 1000", times["/metrics"] <= 1),
                 (f"slowest page call at {count:,} jobs, {kind}: {slowest} (ms)",
                  times[slowest] * 1e3, None, "<= 1000", times[slowest] <= 1),
                 (f"a page refreshing each second, {count:,} jobs, {kind} (cores; ref: idle)",
                  polled, idle, "<= idle + 0.1", polled <= idle + 0.1)]
    return rows


def counted(store, method):
    """Count the calls of store.method from now on: a one-item list, read at the end."""
    calls, original = [0], getattr(store, method)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    setattr(store, method, wrapper)
    return calls


def postgres_wal_syncs(url):
    """The server's WAL syncs so far. Each backend publishes its statistics when it
    goes idle, at most once a second: so wait until the figure stands still."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as connection:
        last, deadline = None, time.monotonic() + 10
        while time.monotonic() < deadline:
            ((syncs,),) = connection.execute("SELECT wal_sync FROM pg_stat_wal").fetchall()
            if syncs == last:
                return syncs
            last = syncs
            time.sleep(1.1)
        return last


def strace_fsyncs(pid):
    """Attach strace to process `pid` (and the threads it starts): a function that
    returns its fsync and fdatasync calls once the process has ended, or None where
    strace is missing or may not attach (ptrace_scope)."""
    if shutil.which("strace") is None:
        return None
    out = tempfile.NamedTemporaryFile("r", suffix=".strace")  # noqa: SIM115 - read later
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-c", "-o", out.name, "-e", "trace=fsync,fdatasync",
         "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not re.search(r"TracerPid:\s+[1-9]", Path(f"/proc/{pid}/status").read_text()):
        if tracer.poll() is not None or time.monotonic() > deadline:
            tracer.kill()
            tracer.wait()
            out.close()
            return None
        time.sleep(0.01)

    def calls():
        tracer.wait(30)  # it ends, writing its summary, when the traced process does
        with out:
            found = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync$",
                               out.read(), re.MULTILINE)
        return sum(int(n) for n in found)
    return calls


def bench_makespan(dbs, quick):
    """5. 2,000 jobs of valor 0.05 with 16 workers, against the ideal 2000 x 0.05 / 16."""
    jobs, valor, workers = (400 if quick else 2000), 0.05, 16
    app = queue_tool.make_app(db=dbs.new("makespan"), workers=workers)
    try:
        app.start()
        time.sleep(0.2)
        batch = json.dumps([{"item": "w", "valor": valor}] * 100).encode()
        tokens = []
        began = time.time()
        for _ in range(jobs // 100):
            tokens += [e["hash"] for e in json.loads(call(app, "POST", "/api", batch)[1])[
                "processing_items"]]
        for token in tokens:
            call(app, "GET", f"/check/{token}", query="wait=30")
        measured = max(app.store.get(token)["finished_at"] for token in tokens) - began
    finally:
        app.close(grace=0)
    ideal = jobs * valor / workers
    return [(f"makespan, {jobs} x {valor}s / {workers} workers (s)", measured, ideal,
             f"efficiency (ideal/measured) {ideal / measured:.2f} >= 0.85",
             ideal / measured >= 0.85)]


def bench_memory(dbs, quick):
    """6. RSS growth of the serving process over many finished valor-0 jobs."""
    count = 10_000 if quick else 100_000
    served = Served(dbs.workdir, "--db", dbs.new("memory"), "--workers", "16",
                    "--max-queued", str(count + 1000))
    batch = [{"item": "m", "valor": 0}] * 1000

    def run(total):
        for _ in range(total // 1000):
            status, _ = served.request("POST", "/api", batch)
            assert status == 202, status
        while True:
            health = json.loads(served.request("GET", "/health")[1])
            if health["queued"] == health["running"] == 0:
                return
            time.sleep(0.05)
    try:
        run(5000)  # warm up: caches, the page cache, thread stacks
        rss_before, threads_before = rss_and_threads(served.process.pid)
        run(count)
        rss_after, threads_after = rss_and_threads(served.process.pid)
    finally:
        served.stop()
    growth = (rss_after - rss_before) / 2**20
    return [(f"RSS growth over {count:,} jobs (MiB)", growth, rss_before / 2**20,
             "<= 10 MiB", growth <= 10),
            ("threads after / before (16 workers)", threads_after, threads_before,
             "workers + a constant", threads_after <= threads_before)]


def bench_scale(dbs, quick):
    """7. Check latency with 1,000 stored jobs against 1,000,000."""
    big = 100_000 if quick else 1_000_000
    apps, picks = [], []
    for size in (1000, big):
        db = dbs.new(f"scale-{size}")
        store = queue_tool.open_store(db)
        tokens = []
        for start in range(0, size, 50_000):
            chunk = [(os.urandom(16).hex(), "s", 0) for _ in range(min(50_000, size - start))]
            store.submit(chunk, 0, size + 1)
            tokens += [token for token, _, _ in chunk]
        store.close()
        apps.append(queue_tool.make_app(db=db, workers=0, max_queued=size + 1))
        picks.append([f"/check/{random.choice(tokens)}" for _ in range(1000)])

    def median_latency(n):
        times = []
        for path in picks[n]:
            began = time.perf_counter()
            call(apps[n], "GET", path)
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1e6
    best = [float("inf")] * 2
    try:
        for _ in range(3 if quick else 7):  # alternate, so noise hits both sizes alike
            for n in (0, 1):
                best[n] = min(best[n], median_latency(n))
    finally:
        for app in apps:
            app.close(grace=0)
    return [(f"check latency at {big:,} jobs (us)", best[1], best[0],
             "<= 1.5 x the 1,000-job figure", best[1] <= 1.5 * best[0])]


def cpu_seconds(pid):
    """User and system CPU a process has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scheduled_rows(db):
    """(schedule, slot, created_at) of every job a schedule made, times in epoch seconds."""
    if db.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(db) as connection:
            return connection.execute(
                "SELECT schedule, extract(epoch FROM slot)::float8,"
                " extract(epoch FROM created_at)::float8 FROM queue_tool_jobs"
                " WHERE schedule IS NOT NULL").fetchall()
    import sqlite3
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT schedule, slot, created_at FROM jobs"
                                  " WHERE schedule IS NOT NULL").fetchall()


def bench_schedules(dbs, quick):
    """10. Schedules of `every: 1` served by three --workers 0 processes on one store:
    jobs per slot, lateness of created_at after the slot, and each process's CPU
    while scheduling against the same processes idle (the reference)."""
    count, seconds = (100, 8) if quick else (1000, 30)
    rows = []
    for kind in dbs.kinds():
        db = dbs.new("schedules", kind)
        queue_tool.open_store(db).close()  # the schema, before three processes race for it
        fleet = [Served(dbs.workdir, "--db", db, "--workers", "0") for _ in range(3)]
        try:
            time.sleep(1)  # started: their first looks are done
            idle = [cpu_seconds(served.process.pid) for served in fleet]
            time.sleep(5)
            idle = [(cpu_seconds(served.process.pid) - was) / 5 for served, was in zip(fleet, idle)]
            store = queue_tool.open_store(db)
            for n in range(count):
                store.put_schedule(f"s{n}", {"cron": None, "every": 1, "timezone": None,
                                             "job": {"item": f"s{n}", "valor": 0},
                                             "paused": False})
            store.close()
            began, cpu = time.time(), [cpu_seconds(served.process.pid) for served in fleet]
            time.sleep(seconds)
            ended = time.time()
            busy = [(cpu_seconds(served.process.pid) - was) / (ended - began)
                    for served, was in zip(fleet, cpu)]
        finally:
            for served in fleet:
                served.stop()
        # The slots wholly inside the window, each of which every schedule must fill.
        first, last = int(began) + 2, int(ended) - 2
        made = collections.Counter((name, slot) for name, slot, _ in scheduled_rows(db)
                                   if first <= slot <= last)
        expected = count * (last - first + 1)
        late = [created - slot for _, slot, created in scheduled_rows(db)
                if first <= slot <= last]
        per_slot = sum(made.values()) / expected
        p50, p99 = percentile(late, 0.5), percentile(late, 0.99)
        rows += [
            (f"schedules, {kind}, jobs per slot ({count:,} every 1 s, 3 processes)", per_slot,
             None, "exactly 1", per_slot == 1 and max(made.values()) == 1),
            (f"schedules, {kind}, created_at - slot p50 (ms)", p50 * 1e3, None,
             "ratio printed", None),
            (f"schedules, {kind}, created_at - slot p99 (ms)", p99 * 1e3, None, "<= 1,000 ms",
             p99 <= 1.0),
            (f"schedules, {kind}, CPU per process, busiest (% of a core; ref: idle)",
             max(busy) * 100, max(idle) * 100, "<= 10%", max(busy) <= 0.10)]
    return rows


def bench_unique(dbs, quick):
    """11. 100-item batches with a `unique` key on every item, against the same
    batches without, in-process on one store (items/s)."""
    batches, rounds = (20, 3) if quick else (100, 5)
    rows = []
    for kind in dbs.kinds():
        app = queue_tool.make_app(db=dbs.new("unique", kind), workers=0,
                                  max_queued=10_000_000)
        keys = itertools.count()
        keyed = iter([json.dumps([{**item, "unique": f"key-{next(keys)}"} for item in BATCH]
                                 ).encode() for _ in range(batches * (rounds + 1))])
        plain = json.dumps(BATCH).encode()

        def send(bodies, app=app):
            for body in bodies:
                assert call(app, "POST", "/api", body)[0] == 202
        try:
            send([next(keyed) for _ in range(batches)])  # warm up
            ours, reference = side_by_side(
                lambda keyed=keyed: timed_rate(batches * 100, lambda: send(
                    [next(keyed) for _ in range(batches)])),
                lambda plain=plain: timed_rate(batches * 100, lambda: send([plain] * batches)),
                rounds=rounds)
        finally:
            app.close(grace=0)
        rows.append((f"submit with a unique key per item, {kind} (items/s; ref: without)",
                     ours, reference, ">= 0.8 of reference", ours >= 0.8 * reference))
    return rows


MEASURES = {"submit": bench_submit, "check": bench_check, "http": bench_http,
            "burst": bench_burst, "single": bench_single,
            "dispatch": bench_dispatch, "across": bench_dispatch_across,
            "makespan": bench_makespan, "memory": bench_memory, "scale": bench_scale,
            "process": bench_process, "gunicorn": bench_gunicorn,
            "schedules": bench_schedules, "unique": bench_unique, "limits": bench_limits,
            "cpu": bench_cpu, "logs": bench_logs, "served": bench_served, "web": bench_web,
            # Last: a million rows each store goes on vacuuming and analysing for a
            # while after (the served rows ran at half speed behind it).
            "fleet": bench_fleet}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--postgres", default=POSTGRES,
                        help="PostgreSQL server for the [postgres] rows ('' for none)")
    parser.add_argument("--serve-trivial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_trivial:
        return serve_trivial()
    if args.process_run:
        return process_child(args.process_run)
    chosen = args.only.split(",") if args.only else list(MEASURES)
    random.seed(1)
    print(f"queue_tool {queue_tool.__version__} benchmark, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"SQLite {queue_tool.sqlite3.sqlite_version}{', --quick' if args.quick else ''}")
    rows = []
    postgres = args.postgres if args.postgres and postgres_reachable(args.postgres) else None
    with tempfile.TemporaryDirectory(prefix="queue_tool_bench_") as workdir:
        dbs = Databases(workdir, postgres)
        try:
            for name in chosen:
                os.sync()  # the last measure's writes are flushed before this one starts
                began = time.monotonic()
                new = MEASURES[name](dbs, args.quick)
                rows += new
                for row in new:
                    print_row(row)
                print(f"  ({name}: {time.monotonic() - began:.1f}s)", file=sys.stderr)
        finally:
            dbs.drop()
    print()
    print_table(rows)
    return 0


def fmt(value):
    if value is None:
        return "-"
    if 0 < abs(value) < 0.1:
        return f"{value:.3f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def print_row(row):
    name, ours, reference, target, met = row
    ratio = "-" if not reference else f"{ours / reference:.2f}"
    verdict = {True: "met", False: "NOT MET", None: ""}[met]
    print(f"| {name} | {fmt(ours)} | {fmt(reference)} | {ratio} | {target} | {verdict} |",
          flush=True)


def print_table(rows):
    print("| measure | queue_tool | reference | ratio | target | |")
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        print_row(row)


if __name__ == "__main__":
    sys.exit(main())
