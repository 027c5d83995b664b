"""pyproject.toml and environment.yml declare the same packages."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _name(spec):
    return re.split(r"[<>=!~ ]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    wanted = {_name(s): s.replace(" ", "") for s in specs}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    have = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for spec in items:
            if spec.startswith("-e") or _name(spec) in ("python", "pip"):
                continue
            name = CONDA_NAMES.get(_name(spec), _name(spec))
            have[name] = name + spec.replace(" ", "")[len(_name(spec)):]
    assert have == wanted
