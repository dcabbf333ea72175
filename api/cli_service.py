"""`strata serve | api | scheduler | tokens | gc`: running Strata, bootstrapping access and
collecting garbage."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

from api import progress
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    """The embedded default: API + in-process worker threads on SQLite and a local directory."""
    import uvicorn

    from api.app import create_app, freeze_startup_objects
    from workers.inprocess import InProcessWorker
    from workers.predict import InProcessPredictor

    try:  # the port first: a busy one must not cost the first admin token (printed once)
        sock = _listen(args.host, args.port)
    except OSError as exc:
        print(
            f"error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); is "
            "another server running there? Choose another with --port",
            file=sys.stderr,
        )
        return 2
    settings = StrataSettings(data_dir=args.data_dir) if args.data_dir else StrataSettings()
    settings = settings.embedded()  # base models import from the data dir's imports/
    (settings.data_dir / "imports").mkdir(parents=True, exist_ok=True)
    inst = open_instance(settings)
    _first_token(inst)
    progress.quiet_libraries()  # a server's log: no "Loading weights" bars from its worker
    worker = InProcessWorker(inst, threads=args.workers).start()
    try:
        app = create_app(inst, worker, InProcessPredictor(inst))
        freeze_startup_objects()
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"dashboard: http://{host}:{args.port}/ui (log in with a token)", flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        worker.stop(timeout=5)
        inst.close()
    return 0


# uvicorn's supervisor pings each server process and replaces one that does not answer in time
# (5 s by default). The API process no longer imports the training stack, but a starting process
# on a busy 2-core machine still took longer than that (tests/api/test_cli_service.py under a full
# suite), and the default replaced processes that were only slow to start, again and again.
HEALTHCHECK_TIMEOUT_S = 60


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds >= 1, not {text}")
    return value


def cmd_api(args: argparse.Namespace) -> int:
    """The service's API process: jobs go to Celery workers through the broker. With several
    server processes, /metrics adds up their counts through prometheus_client's multiprocess
    directory: PROMETHEUS_MULTIPROC_DIR, emptied first, or a fresh temporary one."""
    from services import metrics_dir

    temporary = None
    if args.workers > 1 or metrics_dir.multiprocess_dir() is not None:
        given = metrics_dir.multiprocess_dir()
        path = metrics_dir.prepare(prefix="strata-api-metrics-")
        temporary = None if given else path
        log.info("metrics of the %d server processes are kept in %s", args.workers, path)
    try:
        _run_uvicorn(args)
    finally:
        if temporary is not None:  # ours: gone with the server
            os.environ.pop(metrics_dir.ENV, None)
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


def _run_uvicorn(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(
        "api.asgi:service_app", factory=True, host=args.host, port=args.port,
        workers=args.workers, timeout_worker_healthcheck=args.healthcheck_timeout,
    )  # fmt: skip


def cmd_scheduler(_args: argparse.Namespace) -> int:
    """Fire due schedules and reconcile jobs; one of several such processes leads at a time."""
    from services.broker import CeleryDispatcher
    from services.scheduler import run_scheduler

    inst = open_instance(StrataSettings(), upgrade=False)
    stop = threading.Event()
    try:
        run_scheduler(inst, CeleryDispatcher(), stop=stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    """Manage tokens directly in the configured database (how the first admin token is made)."""
    inst = open_instance(StrataSettings(), upgrade=True)
    tokens = inst.registry.tokens
    if args.action == "create":
        token, secret = tokens.create(name=args.name, scopes=args.scope or ["read", "write"])
        print(f"token {token.id} '{token.name}' ({', '.join(token.scopes)}):\n{secret}")
        print("store it now: it is not shown again", file=sys.stderr)
    elif args.action == "list":
        for t in tokens.list_tokens():
            state = "revoked" if t.revoked_at else "active"
            print(f"{t.id:>4}  {t.name:<20} {t.prefix}...  {','.join(t.scopes):<18} {state}")
    else:
        tokens.revoke(args.id)
        print(f"token {args.id} revoked")
    inst.close()
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Purge rows past their retention and blobs nothing references, directly in the
    configured database and store (safe while the service runs: see services.gc)."""
    from tqdm import tqdm

    from services.gc import collect_garbage

    settings = StrataSettings(data_dir=args.data_dir) if args.data_dir else StrataSettings()
    if settings.database_url is None and not (settings.data_dir / "registry.db").is_file():
        where = settings.data_dir
        print(f"no Strata instance in {where}: pass --data-dir (or set STRATA_DATA_DIR or "
              "STRATA_DATABASE_URL) as the server has it", file=sys.stderr)  # fmt: skip
        return 2
    inst = open_instance(settings, upgrade=False)
    with tqdm(desc="looking at blobs", unit="blob", disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = collect_garbage(inst, grace_s=args.grace, dry_run=args.dry_run,
                                 on_progress=progress)  # fmt: skip
    inst.close()
    for name in report.purged.streams:
        print(f"purged stream '{name}' (deleted more than the retention period ago)")
    print(report.summary())
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError when it is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _first_token(inst: Instance) -> None:
    """A fresh embedded instance gets an admin token, printed once."""
    if inst.registry.tokens.list_tokens():
        return
    _, secret = inst.registry.tokens.create(name="admin", scopes=["admin"])
    print(f"created the first admin token (shown once):\n  export STRATA_TOKEN={secret}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="API + in-process worker, no servers needed")
    serve.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s; the "
                       "CLI's STRATA_URL must name it)")  # fmt: skip
    serve.add_argument("--data-dir", type=Path, help="default: STRATA_DATA_DIR or .strata")
    serve.add_argument("--workers", type=int, default=1, help="training threads (default: 1)")
    serve.set_defaults(func=cmd_serve)

    api = sub.add_parser("api", help="the service API (jobs go to Celery workers)")
    api.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    api.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    api.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    api.add_argument(
        "--healthcheck-timeout", type=_seconds, default=HEALTHCHECK_TIMEOUT_S, metavar="S",
        help="with --workers above 1: seconds a server process may take to start, or to answer "
        f"the supervisor's ping, before it is replaced (default {HEALTHCHECK_TIMEOUT_S})",
    )  # fmt: skip
    api.set_defaults(func=cmd_api)

    scheduler = sub.add_parser("scheduler", help="fire cron schedules and reconcile jobs")
    scheduler.set_defaults(func=cmd_scheduler)

    tokens = sub.add_parser("tokens", help="API tokens, directly in the database")
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create")
    create.add_argument("--name", default="admin")
    create.add_argument("--scope", action="append", choices=["read", "write", "admin"],
                        help="repeatable; default read and write")  # fmt: skip
    actions.add_parser("list")
    revoke = actions.add_parser("revoke")
    revoke.add_argument("id", type=int)
    tokens.set_defaults(func=cmd_tokens)

    gc = sub.add_parser(
        "gc", help="purge expired deletions and unreferenced blobs (the scheduler also does, "
        "every STRATA_GC_INTERVAL_S)",
    )  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    gc.add_argument("--data-dir", type=Path, help="the embedded instance's directory, as `strata "
                    "serve --data-dir` has it (default: STRATA_DATA_DIR or .strata)")  # fmt: skip
    gc.add_argument("--grace", type=_seconds, default=None, metavar="S",
                    help="keep blobs written or reused within S seconds, referenced or not "
                    "(default STRATA_GC_GRACE_S, 86400)")  # fmt: skip
    gc.set_defaults(func=cmd_gc)
