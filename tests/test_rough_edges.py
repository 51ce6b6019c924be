"""Rough edges a new user hits (issue 13): preset names vs folders, lazy task packages, builder
keyword typos, files named in every checkpoint error, and no unpickling of untrusted data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pvt
from pvt.cli import main as cli_main
from pvt.engine.presets import load_preset

SRC = Path(__file__).resolve().parents[1] / "src" / "pvt"


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # e.g. a previous `pvt train ... --output digits`
    assert load_preset("classification", "digits")["model"]["name"] == "pvt_v2_b0"
    recipe = tmp_path / "mine"
    recipe.write_text("model:\n  name: pvt_tiny\n")  # an existing file is a recipe, whatever its name
    assert load_preset("classification", "mine")["model"]["name"] == "pvt_tiny"


def test_task_packages_load_on_first_use() -> None:
    code = (
        "import sys, pvt; assert 'pvt.detection' not in sys.modules and 'pvt.segmentation' not in sys.modules; "
        "assert callable(pvt.detection.retinanet) and callable(pvt.segmentation.semantic_fpn); "
        "assert callable(pvt.hub.get_source); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute 'detectoin'"):
        pvt.detectoin  # noqa: B018


def test_builders_refuse_unknown_keywords() -> None:
    with pytest.raises(TypeError, match=r"retinanet\(\) got unexpected .*chekpoint \(did you mean checkpoint\?\)"):
        pvt.detection.retinanet("pvt_v2_b0", chekpoint="x.pth")
    with pytest.raises(TypeError, match=r"mask_rcnn\(\) .*box_score_tresh \(did you mean box_score_thresh\?\)"):
        pvt.detection.mask_rcnn("pvt_v2_b0", box_score_tresh=0.1)
    model = pvt.detection.retinanet("pvt_v2_b0", score_thresh=0.2, size_divisible=64)  # torchvision's own
    assert model.score_thresh == 0.2 and model.transform.size_divisible == 64


def test_convert_of_an_unrecognised_file_names_it(tmp_path: Path, capsys) -> None:
    src = tmp_path / "mystery.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, src)
    assert cli_main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2
    assert f"{src}: unknown checkpoint layout" in capsys.readouterr().err


def test_no_code_path_unpickles_untrusted_data() -> None:
    """Every torch.load in the package passes weights_only=True; YAML is read with safe_load."""
    loads = 0
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            line = text[call.end() : call.end() + 200]
            assert "weights_only=True" in line, f"{path}: torch.load without weights_only=True"
            loads += 1
        assert "yaml.load(" not in text and "pickle.load" not in text, f"{path}: unsafe deserialisation"
    assert loads >= 2  # the checkpoint reader's two calls at least: the scan sees the package


def test_progress_is_plain_lines_when_not_on_a_terminal(monkeypatch, capsys) -> None:
    from pvt.engine.trainer import _progress

    bar = _progress(5, "epoch 1/2", True, every=2)  # pytest's stderr is no terminal
    for i in range(5):
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        "epoch 1/2: 2/5 loss 0.5000",
        "epoch 1/2: 4/5 loss 0.2500",
        "epoch 1/2: 5/5 loss 0.2000",
    ]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert type(_progress(5, "epoch 1/2", True, every=2)).__name__ == "tqdm"
