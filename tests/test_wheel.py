"""The wheel as a user gets it: built from the sources, installed in a fresh virtual environment,
run from an empty folder. Its packages, package data and entry points are the wheel's own: the
environment borrows only the dependencies (llama-cpp-python takes minutes to build), from this
environment's site-packages minus shoal's own files, so a module, a data file or an entry point
the wheel lacks fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
JERSEY_CITY = SHARED / "airbnb" / "jersey_city_nj_listings.csv.gz"
# What the checkout installs into site-packages for itself (an editable install): never seen
# by the fresh environment.
OWN = ("shoal", "__editable__", "_shoal")
if not JERSEY_CITY.is_file():  # pragma: no cover - the shared data is part of the setup
    pytestmark = pytest.mark.skip(reason=f"no shared data at {SHARED}")


@dataclass(frozen=True)
class Installed:
    python: Path
    shoal: Path
    empty: Path  # the working directory of every command: nothing in it
    home: Path


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so the checkout gets no build folders.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "examples"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", "-q"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)]
    )
    (wheel,) = (work / "dist").glob("shoal-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)])
    # The dependencies: every entry of this environment's site-packages but shoal's own.
    deps = work / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.startswith(OWN) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (deps / entry.name).symlink_to(entry)
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(f"{deps}\n", "utf-8")
    empty, home = work / "empty", work / "home"
    empty.mkdir()
    home.mkdir()
    return Installed(python=python, shoal=venv / "bin" / "shoal", empty=empty, home=home)


def shoal(
    installed: Installed, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`shoal ARGS` from the empty folder, with a bare environment."""
    base = {
        "PATH": f"{installed.shoal.parent}:/usr/bin:/bin",
        "HOME": str(installed.home),
        "SHOAL_CACHE_DIR": str(installed.home / "cache"),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [str(installed.shoal), *args],
        cwd=installed.empty,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_wheel_is_what_runs(installed: Installed) -> None:
    found = _run(
        [
            str(installed.python),
            "-c",
            "import shoal, shoal_examples.rental.scoring as s; print(shoal.__file__, s.__file__)",
        ]
    ).stdout.split()
    venv = installed.python.parent.parent
    assert all(Path(path).is_relative_to(venv) for path in found), found
    listed = shoal(installed, "pipelines", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"name": "rental", "source": "shoal_examples.rental.pipeline:pipeline"}.items() <= (
        json.loads(listed.stdout)[0].items()
    )


def test_a_yaml_pipeline_runs_from_an_empty_folder(installed: Installed, tmp_path: Path) -> None:
    """The tiny model of the embedded default fleet (the fleet file is the wheel's data)."""
    path = tmp_path / "capital.yaml"
    path.write_text(
        "name: capital\ninputs: [country]\noutput: answer\nsteps:\n"
        "  - {name: answer, kind: model, model: smollm2-135m, prompt: 'The capital of "
        "{country} is', inputs: [country], max_tokens: 8}\n",
        "utf-8",
    )
    done = shoal(installed, "run", str(path), "--input", "country=France", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["pipeline"], result["status"]) == ("capital", "ok")
    assert result["output"].strip()


def test_the_rental_app_says_how_to_find_its_data(installed: Installed, tmp_path: Path) -> None:
    done = shoal(
        installed,
        "run",
        "rental",
        "a flat",
        "--city",
        "albany",
        env={"SHOAL_DATA_DIR": str(tmp_path)},
    )
    assert done.returncode == 2
    said = " ".join(done.stderr.split())
    assert f"no albany_ny_listings.csv.gz in {tmp_path / 'airbnb'} for --city albany" in said
    assert "set SHOAL_DATA_DIR to the folder that holds airbnb/albany_ny_listings.csv.gz" in said
    assert "give a city's listings file itself with --listings FILE" in said


def test_the_rental_app_outside_any_checkout_says_where_to_look(installed: Installed) -> None:
    """No SHOAL_DATA_DIR, and no `shared/data` above the working folder or the installed
    package: the message the issue saw, now with what to do."""
    above = [*installed.empty.parents, *installed.python.parents]
    if any((folder / "shared" / "data").is_dir() for folder in above):
        pytest.skip("a shared/data folder lies above the temporary folders on this machine")
    done = shoal(installed, "run", "rental", "a flat", "--city", "albany")
    assert done.returncode == 2
    said = " ".join(done.stderr.split())
    assert "cannot find the shared data folder for --city albany: set SHOAL_DATA_DIR" in said
    assert "give a city's listings file itself with --listings FILE" in said


def test_the_rental_app_on_a_city_file(installed: Installed, tiny_path: Path) -> None:
    """Jersey City from its listings file, on a fleet whose models are all the tiny one (the
    app's routes name the small and large ids)."""
    fleet = installed.home / "fleet.yaml"
    models = "".join(
        f'  - {{id: {name}, kind: gguf, path: "{tiny_path}", context: 4096}}\n'
        for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
    )
    fleet.write_text(f"include_default: false\nmodels:\n{models}", "utf-8")
    request = "a whole apartment for a family of 5 near the train station"
    done = shoal(
        installed,
        *("run", "rental", request, "--listings", str(JERSEY_CITY), "--fleet", str(fleet)),
        *("--deadline", "240", "--budget", "1", "--json"),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] in ("ok", "partial"), result["stop_reason"]
    answer = result["output"]
    assert "the densest cluster of listings in the file" in answer["where"]
    assert answer["criteria"]["room_type"] == "entire"
    assert answer["ranked"]
    assert answer["explanation"]
    # A bundled city through SHOAL_DATA_DIR (a request no listing fits: one model call).
    done = shoal(
        installed,
        *("run", "rental", "a place for 12 people under $40", "--city", "albany"),
        *("--fleet", str(fleet), "--budget", "1", "--json"),
        env={"SHOAL_DATA_DIR": str(SHARED)},
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["output"]
    assert answer["ranked"] == []
    assert answer["explanation"].startswith("No listing fits all of: at most $40/night, sleeps 12+")
