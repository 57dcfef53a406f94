#!/usr/bin/env python
"""Run the fraud-model pipeline: the stage notebooks, in order, executed with papermill.

The logic lives in the fraudlib.runner package; this file only reads the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fraudlib import runner, settings

DESCRIPTION = """\
Executes the stage notebooks notebooks/NN_name.ipynb in NN order with papermill into
runs/<run_id>/: each executed notebook (NN_name.ipynb, opening with the stage's summary), an
HTML report (NN_name.html: code hidden, a link to the notebook that keeps it), index.html
(the reports, the MLflow run, the Triton version serving afterwards) and run.json (status,
timings, parameters, outputs and errors of every stage, git commit, package versions).
Adding a stage is adding a notebook.

Before any stage runs, every parameter given is checked against the notebooks'
`parameters` cells (type annotations and # help comments; see --list) and, for a stage
notebook naming its fraudlib.stages module, against that stage's Params dataclass (value
rules such as num_epochs >= 1): an unknown name or an invalid value stops the run with exit
status 2.

Each stage's glued outputs (scrapbook.glue) are passed to every later stage that declares a
parameter of that name; `run_dir` is passed to stages that declare it; for stages that
declare `triton_url` the runner starts the embedded Triton server once (log in
runs/<run_id>/triton.log) unless -p triton_url=... or $TRITON_URL names a server. Explicit
parameters (-p, -f) win over all of these.

On a failure (an exception in a cell, the kernel dying, a cell running past --timeout) the
failed notebook is still written with the error at its top, run.json says failed, later
stages do not run and the exit status is 1; --resume continues from the failed stage
(succeeded stages are kept and feed the later ones; the failed notebook is kept as
NN_name.failed-<n>.ipynb, so a run folder is only ever added to). --through STAGE stops after
that stage with the later ones pending (run.json says pending); --resume continues them (the
Prefect flow, fraudlib/flow.py, runs one stage per task this way).
After the run the notebooks, HTML copies and run.json are logged to the MLflow run a stage
glued as `mlflow_run_id` (artifact path notebooks/); a logging failure is only a warning.
"""

EPILOG = """\
parameters:
  -p NAME=VALUE    VALUE is read as a YAML scalar (3, 0.5, true, null, "text", [1, 2],
                   {a: 1}) and converted to the type declared in the notebook (int, float,
                   bool, str, list, dict); a str parameter gets the text exactly as typed.
                   The name applies to every selected stage that declares it.
  -f params.yaml   flat entries apply to every selected stage declaring the name; a
                   top-level key equal to a stage name holds that stage's own parameters:
                       fraud_ratio: 0.1        # every stage declaring fraud_ratio
                       train:                  # only stage NN_train
                         num_epochs: 3
                   Sections of stages not selected are ignored.
                   Precedence: -p > stage section > flat entry > earlier stage outputs.
  paths            a parameter named *_path, *_dir, *_file or *_folder (raw_path,
                   output_dir, graph_dir, model_dir, ...) is a path: a relative one, from -p
                   or -f, is taken from the directory you run this command in (not from
                   notebooks/, where the kernels run) and recorded absolute in run.json.

kernel:
  Stages run in the Jupyter kernel `fraudlib` when `make setup` registered it for this
  virtual environment, else in `python3`, which jupyter_client starts with this same
  interpreter; --kernel NAME picks another one.

environment:
  --runs-dir sets FRAUD_RUNS_DIR for the stage kernels too, so the embedded MLflow store and
  Triton repository of the run live under the same root. MLFLOW_TRACKING_URI, TRITON_URL and
  TRITON_MODEL_REPO point at external services.

exit status: 0 all stages (up to --through) succeeded, 1 a stage failed, 2 invalid arguments
or parameters (nothing ran), 130 interrupted.

examples:
  python run_pipeline.py                                 # all stages, notebook defaults
  python run_pipeline.py --list                          # stages and their parameters
  python run_pipeline.py -p num_epochs=3 -p fraud_ratio=0.2
  python run_pipeline.py -f params.yaml --stages preprocess,train
  python run_pipeline.py --stages 3,4 -p triton_url=localhost:8000
  python run_pipeline.py --timeout 1800 --run-id nightly-2026-11-26
  python run_pipeline.py --resume 20261126-153000-a1b2c3 -p num_epochs=2
  python run_pipeline.py --run-id r1 --through preprocess && python run_pipeline.py --resume r1
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", default=[],
                        metavar="NAME=VALUE", help="set a notebook parameter (repeatable; see below)")
    parser.add_argument("-f", "--parameter-file", type=Path, metavar="PARAMS.yaml",
                        help="YAML file of parameters, flat or per stage (see below)")
    parser.add_argument("--stages", metavar="LIST",
                        help="run only these stages, by number or name: 1,2 or preprocess,train")
    parser.add_argument("--run-id", help="name of the run folder (default: YYYYMMDD-HHMMSS-<random>)")
    parser.add_argument("--resume", metavar="RUN_ID",
                        help="continue a failed run from its failed stage; -p/-f override its parameters")
    parser.add_argument("--through", metavar="STAGE",
                        help="run the stages up to this one (number or name); --resume continues the rest")
    parser.add_argument("--runs-dir", type=Path,
                        help=f"root of the run folders (default: $FRAUD_RUNS_DIR or {settings.runs_root()})")
    parser.add_argument("--notebooks-dir", type=Path, default=settings.project_root() / "notebooks",
                        help="where the NN_name.ipynb stage notebooks are (default: %(default)s)")
    parser.add_argument("--timeout", type=int, metavar="SECONDS",
                        help="fail a stage when one of its cells runs longer than this (default: no limit)")
    parser.add_argument("--kernel", metavar="NAME", help="Jupyter kernel for the stages (default: see below)")
    parser.add_argument("--list", action="store_true", help="print the stages and their parameters, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (args.stages or args.run_id):
        parser.error("--resume continues the stages of the run it names: it takes no --stages or --run-id")
    if args.runs_dir:
        os.environ["FRAUD_RUNS_DIR"] = str(args.runs_dir.resolve())
    runs_dir = settings.runs_root()
    progress = not args.no_progress
    try:
        if args.list:
            print(runner.describe_stages(runner.discover_stages(args.notebooks_dir)), end="")
            return 0
        assignments = runner.parse_assignments(args.parameters)
        if args.resume:
            result = runner.resume_pipeline(
                args.resume, runs_dir, assignments=assignments, parameter_file=args.parameter_file,
                timeout=args.timeout, kernel=args.kernel, progress=progress, through=args.through,
            )
        else:
            result = runner.run_pipeline(
                args.notebooks_dir, runs_dir, stages=args.stages, assignments=assignments,
                parameter_file=args.parameter_file, run_id=args.run_id, timeout=args.timeout,
                kernel=args.kernel, progress=progress, through=args.through,
            )
    except runner.RunSetupError as exc:
        print(f"run_pipeline.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_pipeline.py: interrupted; the run can be continued with --resume", file=sys.stderr)
        return 130
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print()
    print(runner.format_summary(result.record), end="")
    print(f"notebooks, HTML copies and run.json: {result.run_dir}")
    if result.status != runner.SUCCEEDED:
        print(f"continue with: python run_pipeline.py --resume {result.run_id}", file=sys.stderr)
    return 1 if result.status == runner.FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
