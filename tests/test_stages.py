"""The typed stage layer (fraudlib/stages/) and the thin notebooks over it, without kernels."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import nbformat
import pytest

from fraudlib import runner
from fraudlib.stages import STAGE_MODULES, base, deploy, evaluate, preprocess, train

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
STAGES = {"01_preprocess": preprocess, "02_train": train, "03_evaluate": evaluate, "04_deploy": deploy}


def notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", STAGES)
def test_parameters_cell_is_the_stage_dataclass_and_the_notebook_names_its_module(name):
    nb = notebook(name)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == base.parameters_cell(STAGES[name].Params)
    assert nb.metadata["fraudlib"]["stage"] == STAGES[name].__name__
    assert runner.read_stage(NOTEBOOKS / f"{name}.ipynb").params_class is STAGES[name].Params


def test_every_stage_module_has_a_notebook():
    assert sorted(STAGE_MODULES) == sorted(m.__name__ for m in STAGES.values())


@pytest.mark.parametrize("name", STAGES)
def test_notebooks_are_thin_one_stage_call_short_cells_no_logic_and_the_summary_first(name):
    nb = notebook(name)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert all(len(source.splitlines()) <= 25 for source in (c.source for c in nb.cells)), name
    assert sum(f"{STAGES[name].__name__.rsplit('.', 1)[1]}.run(" in source for source in code) == 1
    for source in code:
        tree = ast.parse(source)
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))], source
        assert "latest" not in source and "newest" not in source
    assert "summary" in nb.cells[0].metadata["tags"] and "report.start()" in nb.cells[0].source
    prose = sum(len(c.source.splitlines()) for c in nb.cells if c.cell_type == "markdown")
    assert prose >= sum(len(s.splitlines()) for s in code) // 2, "prose explains each step"


@pytest.mark.parametrize("name", STAGES)
def test_every_notebook_runs_in_the_fraudlib_kernel(name):
    assert notebook(name).metadata["kernelspec"] == {"name": "fraudlib", "display_name": "Python (fraudlib)",
                                                      "language": "python"}


def test_a_name_means_one_thing_across_stages():
    declared: dict[str, dict[str, type]] = {}
    for module in STAGES.values():
        for name, kind in base.field_types(module.Params).items():
            declared.setdefault(name, {})[module.__name__] = kind
    assert "seed" not in declared and "output_dir" not in declared  # each seed and folder says what it is
    for name, kinds in declared.items():
        assert len(set(kinds.values())) == 1, (name, kinds)
    # What one stage writes under a name, the next reads under the same name.
    for earlier, later in ((preprocess, train), (train, evaluate), (evaluate, deploy)):
        passed = {f.name for f in dataclasses.fields(earlier.Outputs) if f.metadata.get("glue") is not False}
        assert passed & {f.name for f in dataclasses.fields(later.Params)}, (earlier, later)


def test_preprocess_params_mirror_the_preprocess_function():
    from fraudlib.preprocess import preprocess as function

    renamed = {"raw_path": "raw_path", "out_dir": "graph_dir", "seed": "sample_seed"}
    fields = {f.name: f for f in dataclasses.fields(preprocess.Params)}
    for name, parameter in inspect.signature(function).parameters.items():
        field = fields[renamed.get(name, name)]  # KeyError: a parameter of preprocess() the stage lacks
        if parameter.default is not inspect.Parameter.empty:
            assert field.default == parameter.default, name


def test_stage_choices_are_the_libraries_own():
    from fraudlib import features, gnn, promotion, training

    assert preprocess.FEATURE_SETS == features.FEATURE_SETS
    assert set(train.LAYERS) == set(gnn.LAYERS)
    assert evaluate.METRICS == promotion.METRICS
    for settings_class, names in ((training.GNNSettings, train.GNN_FIELDS), (training.XGBSettings, train.XGB_FIELDS)):
        defaults = {f.name: f.default for f in dataclasses.fields(settings_class)}
        assert set(names) == set(defaults)
        assert {n: getattr(train.Params(), n) for n in names} == defaults


@pytest.mark.parametrize("params, message", [
    (lambda: train.Params(num_epochs=0), "num_epochs = 0 must be >= 1"),
    (lambda: train.Params(num_epochs="3"), "num_epochs = '3' must be a int"),
    (lambda: train.Params(model_dir="/tmp/model"), "ending in prediction_and_shapley"),
    (lambda: preprocess.Params(feature_set="graph"), "one of 'causal', 'blueprint'"),
    (lambda: preprocess.Params(use_gpu=1), "use_gpu = 1 must be a bool"),
    (lambda: evaluate.Params(confidence_level=1.0), "strictly between 0 and 1"),
    (lambda: evaluate.Params(), "give model_dir"),
    (lambda: deploy.Params(decision="promote"), "needs the challenger_version"),
    (lambda: deploy.Params(decision="maybe"), "one of '', 'promote', 'reject'"),
])
def test_bad_parameters_are_refused_naming_the_stage_field_and_rule(params, message):
    with pytest.raises(base.StageParameterError, match=message.replace("(", r"\(")):
        params()


def test_an_int_is_a_float_and_the_params_are_frozen():
    params = train.Params(learning_rate=1, model_dir="m/prediction_and_shapley")
    assert params.learning_rate == 1.0 and isinstance(params.learning_rate, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.num_epochs = 3


def test_runner_checks_every_value_against_the_dataclasses_before_anything_runs(tmp_path):
    stages = runner.discover_stages(NOTEBOOKS)
    with pytest.raises(runner.ParameterError) as error:
        runner.resolve_parameters(stages, stages, {"num_epochs": "0", "feature_set": "graph",
                                                   "bootstrap_samples": "0"}, {})
    text = str(error.value)
    assert "num_epochs = 0 must be >= 1" in text and "feature_set = 'graph'" in text
    assert "bootstrap_samples = 0 must be >= 1" in text
    assert not (tmp_path / "runs").exists()


def test_a_notebook_drifting_from_its_dataclass_is_refused(tmp_path):
    nb = notebook("02_train")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source.replace("num_epochs: int = 8", "num_epochs: int = 9")
    nbformat.write(nb, tmp_path / "02_train.ipynb")
    with pytest.raises(runner.RunSetupError, match="num_epochs: the cell says int = 9"):
        runner.read_stage(tmp_path / "02_train.ipynb")


def test_outputs_glue_small_values_and_paths_only():
    outputs = train.Outputs(model_dir=Path("/m/prediction_and_shapley"), mlflow_run_id="abc", graph_dir=Path("/g"),
                            manifest_hash="h", test_auprc=0.5, metrics={"big": {}}, summary="text")
    assert base.glue_values(outputs) == {"model_dir": "/m/prediction_and_shapley", "mlflow_run_id": "abc",
                                         "graph_dir": "/g", "manifest_hash": "h", "test_auprc": 0.5}


def test_summary_names_run_commit_data_and_outcome(tmp_path):
    text = base.summary("03 evaluate", tmp_path / "run-7", "ab" * 32, "succeeded: decision reject",
                        [("reason", "interval [-0.1, 0.2] | not above 0")])
    git = base.git_state()
    assert "`run-7`" in text and git["commit"][:12] in text and "abababababababab" in text
    assert "decision reject" in text and r"\| not above 0" in text  # a | in a reason does not break the table
    assert "a notebook run alone" in base.summary("x", tmp_path / "scratch", None, "ok")


# --- JupyterLab and the triton/ folder -------------------------------------------------------

ROOT = NOTEBOOKS.parent


def test_the_fraudlib_kernel_make_setup_registers_runs_this_interpreter():
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("fraudlib")
    assert spec.display_name == "Python (fraudlib)"
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()


def test_every_notebook_in_the_project_opens_in_the_fraudlib_kernel():
    for path in [*NOTEBOOKS.glob("*.ipynb"), *(ROOT / "tests" / "notebooks").glob("*.ipynb")]:
        assert nbformat.read(path, as_version=4).metadata["kernelspec"]["name"] == "fraudlib", path


def python_at_root(code: str, **env) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_a_python_started_at_the_repo_root_imports_torch_geometric():
    done = python_at_root("import sys; assert sys.path[0] == ''; import torch_geometric, torch; print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_triton_folder_is_not_the_triton_package_missing_or_installed(tmp_path):
    missing = python_at_root("import triton")
    assert "ModuleNotFoundError: No module named 'triton'" in missing.stderr
    installed = tmp_path / "site" / "triton"  # the real package on a GPU host, after the repo root on sys.path
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("__version__ = '3.9.0'\n")
    (installed / "language.py").write_text("dtype = 'real'\n")
    done = python_at_root("import triton, triton.language; print(triton.__version__, triton.language.dtype)",
                          PYTHONPATH=str(tmp_path / "site"))
    assert done.stdout.split() == ["3.9.0", "real"], done.stderr[-2000:]
