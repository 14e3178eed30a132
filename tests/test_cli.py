"""The command line's shared behaviour: version, presets, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from klvae import preset
from klvae.cli import main


def test_presets_lists_and_prints_config_json(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "sdxl" in listing and "0.13025" in listing
    assert main(["presets", "flux"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["_class_name"] == "AutoencoderKL" and data["shift_factor"] == 0.1159
    assert data["block_out_channels"] == list(preset("flux").block_out_channels)


def test_errors_are_one_line_without_traceback(capsys):
    assert main(["presets", "sd9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("klvae: error: unknown preset 'sd9'") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "klvae.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("klvae ")
    exe = shutil.which("klvae", path=os.path.dirname(sys.executable)) or shutil.which("klvae")
    if exe is None:
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([exe, "presets", "sd3"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["scaling_factor"] == 1.5305
