"""The SR tools' command lines: --help before any heavy import, usage errors exit non-zero, one output flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sr_tools import evaluate, infer

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "pyiqa", "diffusers", "transformers")

_HELP_PROBE = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("heavy modules:", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("module", ["sr_tools.infer", "sr_tools.evaluate"])
def test_help_imports_no_heavy_module(module):
    """--help must answer in well under a second: it may not import torch, pyiqa or diffusers."""
    probe = _HELP_PROBE.format(module=module, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert "usage: python -m " + module in out.stdout
    assert out.stdout.splitlines()[-1] == "heavy modules: ", out.stdout.splitlines()[-1]


def _one_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (40, 80, 120)).save(folder / "a.png")
    return folder


def test_misspelled_metric_exits_non_zero_with_a_suggestion(tmp_path, capsys):
    hr = _one_image(tmp_path / "hr")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--sr", str(hr), "--hr", str(hr), "--metrics", "psnr,sssim", "-o", str(tmp_path / "o")])
    assert exit.value.code == 2
    assert "unknown metric(s) in --metrics: sssim (did you mean ssim" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_empty_sr_folder_exits_non_zero(tmp_path, capsys):
    hr = _one_image(tmp_path / "hr")
    (tmp_path / "sr").mkdir()
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--sr", str(tmp_path / "sr"), "--hr", str(hr), "--metrics", "psnr"])
    assert exit.value.code == 2
    assert f"--sr {tmp_path / 'sr'} holds no images" in capsys.readouterr().err


def test_both_tools_spell_the_output_flag_alike():
    for parser in (infer.build_parser(), evaluate.build_parser()):
        flags = {s for a in parser._actions if a.dest == "output" for s in a.option_strings}
        assert {"-o", "--output"} <= flags, flags
    args = evaluate.build_parser().parse_args(["--sr", "s", "--hr", "h", "--out", "old"])
    assert args.output == "old"  # the deprecated spelling still works
