"""The package's shape as an installer and a user's project see it: one import
package, `enricher`, whatever folders sit in the user's working directory."""

import importlib.metadata
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from enricher.supervise import WorkerProcess

from .conftest import register_sample

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def declared() -> tuple[dict, list]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["package-dir"], setuptools["packages"]


def test_installing_adds_exactly_one_top_level_import_package():
    top = importlib.metadata.distribution("inference-enricher").read_text("top_level.txt").split()
    assert top == ["enricher"]
    package_dir, packages = declared()
    assert all(name == "enricher" or name.startswith("enricher.") for name in packages)
    # every folder with an __init__.py under a mapped folder is listed, or a wheel would miss it
    on_disk = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rest = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((name, *rest)))
    assert on_disk == set(packages), f"pyproject's packages and the folders differ: {on_disk ^ set(packages)}"


def every_module() -> list[str]:
    """Every module of every declared package (models/ and pipelines/ live outside
    enricher/ on disk, so the folder walk follows pyproject's package-dir)."""
    package_dir, packages = declared()
    out = set(packages)
    for package in packages:
        base = max((name for name in package_dir if package == name or package.startswith(name + ".")), key=len)
        folder = ROOT / package_dir[base] / Path(*package[len(base):].strip(".").split(".") if package != base else ())
        out |= {f"{package}.{m.name}" for m in pkgutil.iter_modules([str(folder)]) if not m.ispkg}
    return sorted(out)


@pytest.fixture
def users_project(tmp_path):
    """A user's working directory with the most common names in ML code, which fail loudly if imported."""
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    (project / "models.py").write_text("raise SystemExit('the user models.py was imported')\n")
    (project / "pipelines" / "__init__.py").write_text("raise SystemExit('the user pipelines/ was imported')\n")
    (project / "config.py").write_text("raise SystemExit('the user config.py was imported')\n")
    return project


def test_a_models_py_and_a_pipelines_package_in_the_working_directory_break_no_import(users_project):
    modules = every_module()
    assert {"enricher.models.anomaly", "enricher.pipelines.workflow", "enricher.cli"} <= set(modules)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('imported', len(sys.argv) - 1)"
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=users_project, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"imported {len(modules)}"


def test_the_cli_and_a_worker_start_in_such_a_directory(users_project, make_settings, tmp_path):
    settings = make_settings()
    register_sample(settings, tmp_path, trained=False)
    env = {**__import__("os").environ, **settings.to_env()}
    done = subprocess.run([sys.executable, "-m", "enricher.cli", "models", "list"], cwd=users_project, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("credit_default\t"), done.stderr[-2000:]
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log", cwd=users_project).start()
    try:
        worker.wait_for(lambda s: s is not None, timeout=90)
    finally:
        assert worker.stop() == 0, (tmp_path / "worker.log").read_text()[-2000:]
