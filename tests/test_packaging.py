"""`pip install .` gives a working package: the wheel carries the default model and the examples, and declares the
`fashionchameleon` command and the dependencies (built offline from this checkout, with the installed setuptools)."""

import shutil
import subprocess
import sys
import zipfile

from fashionchameleon.presets import get_preset
from helpers import ROOT


def test_wheel_carries_the_default_model_the_examples_and_the_command(tmp_path):
    source = tmp_path / "source"  # what a build reads, copied, so the build's own folders stay out of the checkout
    shutil.copytree(ROOT / "fashionchameleon", source / "fashionchameleon",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("fashionchameleon-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "fashionchameleon"
    preset = get_preset("mini")
    shipped = [*preset.weights.rglob("*"), *preset.teacher.weights.rglob("*"), *preset.examples.rglob("*")]
    expected = {path.relative_to(ROOT).as_posix() for path in shipped if path.is_file()}
    assert len(expected) > 15 and expected <= names
    assert {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")} <= names
    metadata = zipfile.ZipFile(wheel)
    dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
    assert "fashionchameleon = fashionchameleon.cli:main" in metadata.read(f"{dist_info}/entry_points.txt").decode()
    requires = [line for line in metadata.read(f"{dist_info}/METADATA").decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert any("diffusers" in line for line in requires) and any("torch" in line for line in requires)
