"""The GPU run's script (`scripts/device/check.py`), run on the CPU on the tiny preset."""

import json
import subprocess
import sys

from helpers import ROOT


def test_device_script_dry_run(tmp_path):
    """`scripts/device/check.py --device cpu --tiny`: the GPU run's code end to end, writing every measurement."""
    out = tmp_path / "dry.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/device/check.py"), "--device", "cpu", "--tiny", "--out",
                    str(out)], check=True, capture_output=True, cwd=tmp_path)
    report = json.loads(out.read_text())
    stream = report["stream"]
    assert stream["chunks"] == 6 and stream["switches"] == 2 and stream["fps"] > 0 and stream["dit_fps"] > stream["fps"]
    assert stream["first_frame_ms"] > 0 and stream["decode_ms_median"] > 0 and stream["switch_ms_median"] > 0
    precision = report["precision"]
    assert 0 < precision["error_rms_relative"] < 0.05
    for stage in ("teacher", "forcing", "dmd"):
        assert report[f"train_{stage}"]["finite"], report[f"train_{stage}"]
    assert report["train_forcing"]["sequence_tokens"] == 2 * report["train_teacher"]["sequence_tokens"]
    assert report["train_dmd"]["updates"] == ["generator", "critic"]
    assert "finished" in report
