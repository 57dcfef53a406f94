"""``fraud``: operate the served model between pipeline runs.

    fraud status                 champion, staged challenger, archive, Triton, registry
    fraud serve                  keep the champion online with the embedded Triton until Ctrl-C
    fraud score FILE.csv         score raw TabFormer-format rows against the served champion
    fraud reconcile              repair repository and registry after a crash
    fraud generate --rows N      write a synthetic TabFormer-format file

Without ``--triton-url`` (or ``$TRITON_URL``) the commands that need a server start the
embedded one on the repository under runs/ (``$TRITON_MODEL_REPO``) for their duration.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from fraudlib import settings


def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton-url", default=os.environ.get("TRITON_URL", ""),
                        help="external Triton server host:port (default: $TRITON_URL, else embedded)")


@contextlib.contextmanager
def _client(url: str, log_name: str, port: int | None = None, load_champion: bool = False):
    """A client of the external server at ``url``, or of an embedded one started for the
    duration (with the champion loaded when ``load_champion``: explicit model control)."""
    from fraudlib.triton_server import connect_or_start

    with connect_or_start(url, settings.runs_root() / "serve" / f"{log_name}.log", http_port=port) as client:
        if load_champion and not url:
            from fraudlib import lifecycle

            lifecycle.repository(client).load()
        yield client


def consistency_problems() -> list[str]:
    """What stops the repository from serving one champion agreed with the registry: a live
    pipeline at work, state a crashed run left, or no champion (``lifecycle.diagnose``)."""
    from fraudlib import lifecycle

    d = lifecycle.diagnose()
    return [*d.live, *d.problems, *d.fatal]


def _advice() -> str | None:
    """What to do about ``consistency_problems``: wait for a live pipeline (never reconcile
    under it), reconcile what a crashed run left, or run the pipeline."""
    from fraudlib import lifecycle

    return lifecycle.diagnose().advice


def cmd_status(args) -> int:
    from fraudlib import lifecycle, registry
    from fraudlib.triton_server import TritonError

    state = lifecycle.repository(None).state()
    print(f"repository: {settings.triton_model_repository()}")
    print(f"  champion: {state.champion}  staged challenger: {state.challenger}  "
          f"on disk: {list(state.versions_on_disk)}  archived: {list(state.archived)}")
    if state.journal:
        print(f"  unfinished transition: {state.journal}")
    triton_failed = False
    if args.triton_url:
        try:
            with _client(args.triton_url, "status") as client:
                for model in client.repository_index():
                    print(f"  triton: {model.get('name')} v{model.get('version')} {model.get('state')}")
        except TritonError as e:  # unreachable, or its control API refused us: not a healthy status
            print(f"  triton: {e}")
            triton_failed = True
    print(f"registry: {settings.REGISTERED_MODEL_NAME} at {settings.mlflow_tracking_uri()}")
    for v in registry.versions():
        print(f"  version {v.version}: triton v{v.triton_version} aliases [{', '.join(v.aliases)}] run {v.run_id}")
    problems = consistency_problems()
    for p in problems:
        print(f"INCONSISTENT: {p}")
    if problems:
        print(f"fix: {_advice()}")
    if problems:
        return 1
    if triton_failed:
        print(f"TRITON UNAVAILABLE: {args.triton_url}")
        return 3
    return 0


def cmd_reconcile(args) -> int:
    from fraudlib import lifecycle
    from fraudlib.triton_repo import describe_owner

    holder = lifecycle.repository(None).lock_holder()
    if holder is not None:
        print(f"waiting: {describe_owner(holder)} holds the repository lock for its "
              f"{holder.get('operation', '?')} since {holder.get('since', '?')}", flush=True)
    with _client(args.triton_url, "reconcile") as client:
        report = lifecycle.reconcile(client, reject_challenger=not args.keep_challenger, force=args.force)
    print(f"champion: {report.champion}  challenger: {report.challenger}")
    for action in report.actions:
        print(f"  {action}")
    if not report.actions:
        print("  nothing to repair")
    return 0


def cmd_serve(args) -> int:
    from fraudlib import lifecycle

    problems = consistency_problems()
    if problems:
        for p in problems:
            print(f"refusing to serve: {p}", file=sys.stderr)
        print(f"fix: {_advice()}; then `fraud serve` again", file=sys.stderr)
        return 2
    import time

    from fraudlib.triton_server import EmbeddedTriton, Supervisor, TritonError

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def report(message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} fraud serve: {message}", file=sys.stderr, flush=True)

    def serve_champion(server: EmbeddedTriton):
        """Load the champion and check it answers (at start, and after each restart)."""
        with server.client() as client:
            repo = lifecycle.repository(client)
            repo.load()
            health = repo.health_check()
        if not health.ok:
            raise TritonError(f"champion failed its health check: {health.reason}")
        return health

    server = EmbeddedTriton(settings.triton_model_repository(), settings.runs_root() / "serve" / "serve.log",
                            http_port=args.port, grpc_port=args.grpc_port)
    with server:
        try:
            health = serve_champion(server)
        except TritonError as e:
            print(str(e), file=sys.stderr)
            return 3
        print(f"serving {settings.TRITON_MODEL_NAME} version {health.version} at http://{server.url} "
              f"(gRPC {server.grpc_url}, tritonserver pid {server.pid}; health: {health.reason}); "
              "Ctrl-C stops", flush=True)
        # A dead tritonserver is restarted (at most --max-restarts times in --restart-window
        # seconds, each logged); beyond that, serve exits non-zero with the reason.
        supervisor = Supervisor(server, serve_champion, max_restarts=args.max_restarts,
                                window_s=args.restart_window, report=report)
        if not supervisor.run(stop):
            print(f"fraud serve: stopped serving: {supervisor.reason}", file=sys.stderr)
            return 4
    print("stopped")
    return 0


def cmd_score(args) -> int:
    import pandas as pd

    from fraudlib import scoring

    with _client(args.triton_url, "score", load_champion=True) as client:
        scored = scoring.score_transactions(client, Path(args.csv))
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 160):
        print(scored.to_string(index=False, max_rows=args.max_rows))
    print(f"scored by the champion inside their graph context: {scored.attrs.get('context_edges', 0)} edges "
          "(the new rows plus the champion's test transactions of the same cards and merchants, 2 hops)")
    if args.out:
        scored.to_csv(args.out, index=False)
        print(f"written to {args.out}")
    return 0


def cmd_generate(args) -> int:
    from fraudlib import synthetic

    summary = synthetic.generate(Path(args.out), args.rows, seed=args.seed, progress=True, regime=args.regime)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fraud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="print the serving state: repository, Triton, registry")
    _server_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("serve", help="keep the champion online with the embedded Triton until stopped")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (default 8001)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts of a dead tritonserver within --restart-window before giving up "
                        "(exit 4; default 3)")
    p.add_argument("--restart-window", type=float, default=600.0,
                   help="seconds over which --max-restarts counts (default 600)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score raw TabFormer-format rows against the served champion")
    p.add_argument("csv", help="CSV with the 15 TabFormer columns (e.g. card_transaction.v1.csv rows)")
    p.add_argument("--out", help="also write the scores to this CSV")
    p.add_argument("--max-rows", type=int, default=50, help="rows printed (default 50)")
    _server_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("reconcile", help="repair repository and registry after a crash")
    p.add_argument("--keep-challenger", action="store_true",
                   help="keep a staged challenger (default: reject it when the run that staged it is gone; "
                        "a live run's challenger is always kept)")
    p.add_argument("--force", action="store_true",
                   help="reject a staged challenger even when the process that staged it still runs "
                        "(e.g. an abandoned notebook session); this breaks that run")
    _server_args(p)
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("generate", help="write a synthetic TabFormer-format CSV")
    p.add_argument("--rows", type=int, required=True, help="number of transactions")
    p.add_argument("--out", required=True, help="output CSV path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", default="default",
                   help="fraud in the file: default (all mechanisms), compromised_merchant, fraud_ring, "
                        "card_testing (one alone) or row_only (no graph structure, a control)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return args.func(args)
    except (LookupError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"fraud {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
