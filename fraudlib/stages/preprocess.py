"""Stage 1, preprocess: raw TabFormer transactions -> the graph directory the training reads.

The fields mirror :func:`fraudlib.preprocess.preprocess` (its ``seed`` is ``sample_seed`` here,
its ``out_dir`` is ``graph_dir``; a test keeps them in step), plus where the input comes from:
``raw_path`` is a TabFormer file or a transaction store folder (:mod:`fraudlib.store`). This module imports no
pandas before the dataframe backend is chosen (cuDF's pandas accelerator on a GPU host).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from fraudlib import settings
from fraudlib.stages import base
from fraudlib.stages.base import param

FEATURE_SETS = ("causal", "blueprint")  # fraudlib.features.FEATURE_SETS (a test keeps them equal)
ENGINES = ("pandas", "dask", "auto")  # fraudlib.dask_engine.ENGINES (a test keeps them equal)
FULL_SIZE = 24_386_900  # rows of the real TabFormer file


@dataclass(frozen=True)
class Params(base.StageParams):
    raw_path: str = param("", "TabFormer CSV/.gz/.tgz, a glob of them, or a transaction store folder; empty: the embedded default data (a synthetic file in its format)")
    synthetic_rows: int = param(FULL_SIZE, "rows of the embedded synthetic data when raw_path is empty (the real file has 24,386,900)",
                                lambda v: v > 0, "> 0")
    synthetic_seed: int = param(0, "seed of the embedded synthetic data when raw_path is empty")
    graph_dir: str = param("", "graph directory written; empty: <run_dir>/graph")
    run_dir: str = param("", "run folder (set by run_pipeline.py); empty: runs/scratch")
    fraud_ratio: float = param(0.1, "fraud / non-fraud after undersampling (the blueprint's definition)",
                               lambda v: v > 0, "> 0")
    under_sample: bool = param(True, "undersample non-fraud rows to fraud_ratio")
    deduplicate: bool = param(False, "keep only the first of non-fraud rows equal on the nominal columns (the blueprint: True)")
    undersample_test: bool = param(False, "undersample the test period like training (the blueprint); default: every transaction of it, at its natural fraud rate")
    feature_set: str = param("causal", "causal: blueprint edge features + causal graph/time features; blueprint: the blueprint's exactly",
                             choices=FEATURE_SETS)
    label_delay_days: int = param(60, "label-aware features use only labels older than this (chargebacks arrive late)",
                                  lambda v: v >= 0, ">= 0")
    as_of: str = param("", "YYYY-MM: split by rolling windows of months before it (rows from it on are ignored); empty: the blueprint's year split",
                       lambda v: not v or bool(re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", v)), "empty or YYYY-MM")
    train_months: int = param(12, "with as_of: months of the training window", lambda v: v >= 1, ">= 1")
    val_months: int = param(1, "with as_of: months of the validation window (before the test window)", lambda v: v >= 1, ">= 1")
    test_months: int = param(1, "with as_of: months of the test window (just before as_of)", lambda v: v >= 1, ">= 1")
    sample_seed: int = param(42, "seed of the undersampling draw and of the edge shuffle")
    use_gpu: bool = param(True, "use cuDF (cudf.pandas) when a GPU and cuDF are present")
    engine: str = param("pandas", "pandas: read the input in this process; dask: in parallel partitions on a Dask cluster (same graph); auto: dask above 50,000,000 input rows",
                        choices=ENGINES)
    scheduler_address: str = param("", "dask engine: an existing cluster's scheduler (tcp://host:8786); empty: $DASK_SCHEDULER_ADDRESS, else a local cluster sized to this machine")


@dataclass(frozen=True)
class Outputs:
    graph_dir: Path
    manifest_hash: str
    transactions: int
    edges: dict  # split -> edges
    fraud_edges: dict  # split -> fraud edges
    feature_dims: dict  # user / merchant / edge feature dimensions
    data_source: str  # the input file, and whether it is the embedded default data
    seconds: float
    engine: str = "pandas"  # the engine that read the input (auto resolved)
    dask_dashboard: str = ""  # the Dask dashboard's link (dask engine)
    plots: dict = field(default_factory=dict, metadata={"glue": False})  # name -> PNG path
    summary: str = field(default="", repr=False, metadata={"glue": False})


def run(params: Params) -> Outputs:
    from fraudlib import backend

    chosen = backend.activate(prefer_gpu=params.use_gpu)  # before anything imports pandas
    from fraudlib import dask_engine
    from fraudlib import preprocess as pp

    run_dir = base.run_folder(params.run_dir)
    if params.engine != "pandas" and dask_engine.address_of(params.scheduler_address):
        dask_engine.connect(dask_engine.address_of(params.scheduler_address)).close()  # reachable, before any work
    raw = pp.resolve_raw_path(params.raw_path, params.synthetic_rows, params.synthetic_seed)
    source = str(raw) if params.raw_path else (
        f"embedded default data: synthetic TabFormer-format file, {params.synthetic_rows:,} rows, "
        f"seed {params.synthetic_seed} ({raw})")
    graph_dir = Path(params.graph_dir).expanduser().resolve() if params.graph_dir else run_dir / "graph"
    done = pp.preprocess(raw, graph_dir, fraud_ratio=params.fraud_ratio, under_sample=params.under_sample,
                         seed=params.sample_seed, feature_set=params.feature_set,
                         label_delay_days=params.label_delay_days, deduplicate=params.deduplicate,
                         undersample_test=params.undersample_test,
                         as_of=params.as_of, train_months=params.train_months, val_months=params.val_months,
                         test_months=params.test_months, engine=params.engine,
                         scheduler_address=params.scheduler_address)
    from fraudlib import plots

    tables = pp.report_tables(graph_dir)
    figures = {"edges_per_year": plots.edges_per_year(tables["years"]),
               "degrees": plots.degree_histograms(pp.degrees(graph_dir))}
    plot_paths = {name: plots.save(fig, run_dir / "plots" / f"preprocess_{name}.png") for name, fig in figures.items()}
    plots.close(*figures.values())
    edges = sum(done.edges.values())
    outcome = (f"succeeded: {done.rows:,} transactions -> {edges:,} edges "
               f"({sum(done.fraud_edges.values()):,} fraud) in {done.seconds:.1f} s")
    text = base.summary("01 preprocess", run_dir, done.manifest_hash, outcome,
                        [("input", source), ("graph", f"`{graph_dir}`"),
                         ("dataframe backend", f"{chosen.name} ({chosen.reason})"),
                         ("engine", done.engine + (f" on {done.cluster}" if done.cluster else "")
                          + (f" (Dask dashboard: {done.dashboard})" if done.dashboard else ""))])
    return Outputs(graph_dir=graph_dir, manifest_hash=done.manifest_hash, transactions=done.rows,
                   edges=done.edges, fraud_edges=done.fraud_edges, feature_dims=done.dims,
                   data_source=source, seconds=round(done.seconds, 1), engine=done.engine,
                   dask_dashboard=done.dashboard, plots=plot_paths,
                   summary=text)


def report_tables(outputs: Outputs) -> dict:
    """The report's tables (fraud rate through the row selection, splits, years, feature groups)."""
    from fraudlib import preprocess as pp

    return pp.report_tables(outputs.graph_dir)


def default_graph_dir() -> Path:
    """The graph of the embedded default data (this stage's defaults), built on first use under
    ``runs/data/``: what a later stage opened alone with no graph takes, always the same one."""
    from fraudlib import synthetic

    defaults = Params()
    folder = settings.runs_root() / "data" / (f"graph-synthetic-v{synthetic.VERSION}-{defaults.synthetic_rows}"
                                               f"-seed{defaults.synthetic_seed}-{defaults.feature_set}")
    if not (folder / "manifest.json").is_file():
        run(dataclasses.replace(defaults, graph_dir=str(folder), run_dir=str(folder.parent)))
    return folder
