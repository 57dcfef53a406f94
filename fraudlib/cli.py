"""``fraud``: operate the served model between pipeline runs.

    fraud status                 champion, challenger, last rejected version, Triton, registry
    fraud serve                  keep the champion online with the embedded Triton until Ctrl-C
    fraud score FILE.csv         score raw TabFormer-format rows against the served champion
    fraud reconcile              repair repository and registry after a crash
    fraud generate --rows N      write a synthetic TabFormer-format file
    fraud ingest / replay        add months of transactions to the store (fraudlib.store)

Without ``--triton-url`` (or ``$TRITON_URL``) the commands that need a server start the
embedded one on the repository under runs/ (``$TRITON_MODEL_REPO``) for their duration.
Every command takes ``--version`` and ``--verbose`` (fraudlib's log at DEBUG on stderr; by
default only warnings are logged). A command's answer goes to stdout, its log to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fraudlib import __version__, settings

log = logging.getLogger("fraudlib.cli")
# fraud status: a Triton that does not answer within this is reported unreachable.
STATUS_TIMEOUT_S = 0.5


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


def _describe(v) -> str:
    return f"version {v.version} (Triton v{v.triton_version}, run {v.run_id})"


def _rejection(v) -> str:
    """Why a version was rejected: stage 3's reason (its run's promotion_reason) when deploy
    rejected it on that decision, else what deploy or reconcile wrote (a roll-back after a
    failed health check, a challenger whose run did not finish, one evaluated again)."""
    from fraudlib.registry import NOT_BETTER

    if v.rejected == NOT_BETTER:
        return v.reason or v.rejected
    return v.rejected or "?"


def _triton_lines(url: str) -> tuple[list[str], bool]:
    """What the Triton at ``url`` serves (short timeouts), and whether it answered."""
    from fraudlib.triton_server import TritonClient, TritonError

    try:
        with TritonClient(url, network_timeout_s=STATUS_TIMEOUT_S, connection_timeout_s=STATUS_TIMEOUT_S) as client:
            models = client.repository_index()
    except TritonError as e:  # unreachable, or its control API refused us: not a healthy status
        return [f"triton at {url}:", f"  triton: {e}"], False
    return [f"triton at {url}:"] + ([f"  triton: {m.get('name')} v{m.get('version')} {m.get('state')}"
                                     for m in models] or ["  triton: no model loaded"]), True


def cmd_status(args) -> int:
    """Disk, registry and Triton, read without MLflow's client (``registry.read_versions``) and
    with short Triton timeouts: the answer comes in well under two seconds, also when Triton is
    down. Exit 1: inconsistent; 3: the registry or a Triton that should answer does not."""
    from fraudlib import lifecycle, registry
    from fraudlib.triton_server import running_servers

    state = lifecycle.repository(None).state()
    print(f"repository: {settings.triton_model_repository()}")
    print(f"  champion: {state.champion}  staged challenger: {state.challenger}  "
          f"on disk: {list(state.versions_on_disk)}  archived: {list(state.archived)}")
    if state.journal:
        print(f"  unfinished transition: {state.journal}")
    unreachable = []
    print(f"registry: {settings.REGISTERED_MODEL_NAME} at {settings.mlflow_tracking_uri()}")
    try:
        versions = registry.read_versions()
    except RuntimeError as e:
        versions = None
        unreachable.append(f"REGISTRY UNAVAILABLE: {settings.mlflow_tracking_uri()}")
        print(f"  {e}")
    if versions is not None:
        for label, alias in (("champion", settings.CHAMPION_ALIAS), ("challenger", settings.CHALLENGER_ALIAS)):
            v = registry.alias_of(versions, alias)
            print(f"  {label}: {_describe(v) if v else 'none'}")
        rejected = registry.last_rejected(versions)
        print(f"  last rejected: {_describe(rejected) + ': ' + _rejection(rejected) if rejected else 'none'}")
        for v in versions:
            print(f"  version {v.version}: triton v{v.triton_version} aliases [{', '.join(v.aliases)}] run {v.run_id}"
                  + (" rejected" if v.rejected else ""))
    urls = [args.triton_url] if args.triton_url else [r["url"] for r in running_servers()]
    if not urls:
        print("triton: no embedded server is running (`fraud serve` starts one; --triton-url or $TRITON_URL "
              "for another)")
    for url in urls:
        lines, answered = _triton_lines(url)
        print("\n".join(lines))
        if not answered:
            unreachable.append(f"TRITON UNAVAILABLE: {url}")
    problems = []
    if versions is not None:
        d = lifecycle.diagnose(versions=versions)
        problems = [*d.live, *d.problems, *d.fatal]
        for p in problems:
            print(f"INCONSISTENT: {p}")
        if problems:
            print(f"fix: {d.advice}")
    for what in unreachable:
        print(what)
    return 1 if problems else 3 if unreachable else 0


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
    from fraudlib.triton_server import EmbeddedTriton, Supervisor, TritonError

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def report(message: str) -> None:
        log.warning("fraud serve: %s", message)

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
    """The file is read and validated, and the champion found in the registry, before any
    server starts: a bad file fails in well under two seconds."""
    import pandas as pd

    from fraudlib import scoring

    started = time.monotonic()
    if args.out:
        scoring.output_format(args.out)
    frame = scoring.read_rows(args.csv)
    log.info("%s: %d rows valid (%s) in %.2f s", args.csv, len(frame),
             "labelled" if scoring.LABEL in frame else "no labels", time.monotonic() - started)
    graph_dir = scoring.champion_graph_dir()
    with _client(args.triton_url, "score", load_champion=True) as client:
        scored = scoring.score_transactions(client, frame, graph_dir, args.fanout)
        meta = scoring.champion_meta(client)
        threshold = meta.get("threshold", 0.5)
    scored.insert(0, "line", range(2, len(scored) + 2))
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 160):
        print(scored.to_string(index=False, max_rows=args.max_rows))
    hops = scoring.field_hops(meta["architecture"])
    print(f"scored by the champion inside their graph context: {scored.attrs.get('context_edges', 0):,} edges "
          "(the new rows plus the champion's test transactions their scores read: a "
          + (f"{hops}-hop receptive field)" if args.fanout is None else
             f"sample of their {hops}-hop receptive field, at most {args.fanout} edges a node and hop)"))
    summary = scoring.label_metrics(scored, threshold)
    if summary is not None:
        print("against the rows' labels (Is Fraud?): " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if args.out:
        print(f"written to {scoring.write_scores(scored, args.out)}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def cmd_generate(args) -> int:
    from fraudlib import synthetic

    summary = synthetic.generate(Path(args.out), args.rows, seed=args.seed, progress=True, regime=args.regime,
                                 files=args.files)
    print(summary)
    return 0


def _common_args(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--version and --verbose, on the command and on each subcommand (whose default must not
    overwrite the command's: SUPPRESS)."""
    parser.add_argument("--version", action="version", version=f"fraud (fraudlib) {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="log fraudlib's steps (DEBUG) and libraries' notes (INFO) on stderr")


STORE_COMMANDS = ("ingest", "replay")


def _needs_store(argv: list[str] | None) -> bool:
    """Whether the command line may need fraudlib.store's commands (they, help, or nothing):
    importing it costs half a second (pandas) that `fraud status` must not pay."""
    argv = sys.argv[1:] if argv is None else argv
    return not argv or any(a in (*STORE_COMMANDS, "-h", "--help") for a in argv)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``fraud`` parser; ``argv`` (default: sys.argv) decides whether the store's commands
    are added (:func:`_needs_store`)."""
    parser = argparse.ArgumentParser(prog="fraud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_args(parser, top=True)
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
    p.add_argument("csv", help="TabFormer-format rows (CSV, .gz or .tgz); Is Fraud? optional: new transactions "
                               "have no label yet, and with one the scores are also measured against it")
    p.add_argument("--out", help="also write the scores here: .csv or .parquet (checked before anything runs)")
    p.add_argument("--fanout", type=_positive_int, default=None,
                   help="score in a sample of each row's receptive field: at most this many edges of each "
                        "node at each hop (seeded). Milliseconds a row instead of the whole field's message "
                        "passing (at full size the 3-hop field is the whole test period), with approximate "
                        "scores: docs/model_quality.md gives the AUPRC it costs. Default: the exact field")
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

    p = sub.add_parser("generate", help="write a synthetic TabFormer-format CSV (or several)")
    p.add_argument("--rows", type=int, required=True, help="number of transactions")
    p.add_argument("--out", required=True, help="output CSV path (with --files: a folder)")
    p.add_argument("--files", type=int, default=1,
                   help="write the rows as this many files of equal row counts, part-0000.csv, ..., into the "
                        "folder --out (preprocess them as '<out>/part-*.csv'); default 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", default="default",
                   help="fraud in the file: default (all mechanisms), compromised_merchant, fraud_ring, "
                        "card_testing (one alone) or row_only (no graph structure, a control)")
    p.set_defaults(func=cmd_generate)

    if _needs_store(argv):
        from fraudlib import store

        store.add_commands(sub)
    for command in sub.choices.values():
        _common_args(command)
    return parser


def configure_logging(verbose: bool) -> None:
    """fraudlib's log on stderr: warnings by default; with --verbose fraudlib at DEBUG and
    other libraries at INFO."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("fraudlib").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    configure_logging(args.verbose)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return args.func(args)
    except (LookupError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"fraud {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
