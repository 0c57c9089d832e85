"""vision-daemon and vision-triton find the same export for a model name (fake exports, no models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from triton_serve import options
from vision_daemon.detectors.yolo import resolve_model


def fake_model_dir(root: Path) -> Path:
    """A model directory laid out like ../shared/models: two OpenVINO folders and one .onnx."""
    models = root / "models"
    for stem in ("yolov8n", "yolo11n"):
        folder = models / f"{stem}_int8_openvino_model"
        folder.mkdir(parents=True)
        for name in (f"{stem}.xml", f"{stem}.bin", "metadata.yaml"):
            (folder / name).write_bytes(b"fake")
    (models / "yolov8n_int8.onnx").write_bytes(b"fake")
    return models


def both(name: str, models: Path) -> tuple[Path, Path]:
    """The daemon's resolved path (on CPU, where vision-triton runs) and vision-triton's file."""
    daemon, _ = resolve_model(name, models, "cpu")
    return Path(daemon), options.resolve_model(models, name)


@pytest.mark.parametrize(
    ("name", "export"),
    [
        ("yolov8n", "yolov8n_int8_openvino_model"),
        ("yolov8n_int8", "yolov8n_int8_openvino_model"),
        ("yolo11n", "yolo11n_int8_openvino_model"),
        ("yolov8n_int8_openvino_model", "yolov8n_int8_openvino_model"),
        ("yolov8n_int8.onnx", "yolov8n_int8.onnx"),
    ],
)
def test_a_name_finds_the_same_export_for_daemon_and_triton(
    tmp_path: Path, name: str, export: str
) -> None:
    """A bare name, an _int8 name or an export's own name picks one export for both programs."""
    models = fake_model_dir(tmp_path)
    daemon, triton = both(name, models)
    assert daemon == models / export
    assert triton in (daemon, *daemon.glob("*.xml"))  # a folder is served through its one .xml


def test_a_path_finds_the_same_export_for_daemon_and_triton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full folder path, and a path relative to the working directory, are taken as they are."""
    models = fake_model_dir(tmp_path)
    folder = models / "yolo11n_int8_openvino_model"
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    daemon, triton = both(str(folder), other_dir)
    assert daemon == folder and triton == folder / "yolo11n.xml"
    monkeypatch.chdir(tmp_path)
    daemon, triton = both("models/yolov8n_int8.onnx", other_dir)
    assert daemon == Path("models/yolov8n_int8.onnx") and triton == daemon


def test_triton_names_what_it_tried_and_refuses_weights_it_cannot_serve(tmp_path: Path) -> None:
    """A missing name lists the daemon's candidates; a bare .pt found first is a one-line refusal."""
    models = fake_model_dir(tmp_path)
    with pytest.raises(options.ModelNotFoundError, match="yolov9t_int8_openvino_model") as missing:
        options.resolve_model(models, "yolov9t")
    assert "\n" not in str(missing.value)
    (models / "yolov9t.pt").write_bytes(b"fake")
    assert resolve_model("yolov9t", models, "cpu")[0] == str(models / "yolov9t.pt")
    with pytest.raises(options.ModelNotFoundError, match=r"yolov9t\.pt.*OpenVINO or ONNX"):
        options.resolve_model(models, "yolov9t")
