"""vision-triton's pure pre- and post-processing and its launcher's one-line errors (no server)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from triton_serve import cli, compact, options

MODEL = "yolov8n_int8_openvino_model"


SERVED = "yolov8n_int8"


BUS = Path(cv2.__file__).parents[1] / "ultralytics" / "assets" / "bus.jpg"


def bus_path() -> Path:
    """ultralytics' bus.jpg, or a skip saying it is missing."""
    if not BUS.is_file():
        pytest.skip(f"{BUS} not found: ultralytics' assets are needed")
    return BUS


def test_letterbox_equals_ultralytics() -> None:
    """compact.letterbox gives exactly ultralytics' LetterBox(640, auto=False) image on bus.jpg."""
    from ultralytics.data.augment import LetterBox

    image = cv2.imread(str(bus_path()))
    ours, placement = compact.letterbox(image, 640)
    theirs = LetterBox(new_shape=(640, 640), auto=False)(image=image)
    assert ours.shape == theirs.shape == (640, 640, 3)
    assert np.array_equal(ours, theirs)
    assert placement == compact.Placement(480 / 810, 640 / 1080, 80, 0)


def prediction(rows: list[tuple[float, float, float, float, int, float]]) -> np.ndarray:
    """A raw [4 + 80, anchors] detect output from (cx, cy, w, h, class, score) rows."""
    out = np.zeros((84, len(rows)), dtype=np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(rows):
        out[:4, i] = cx, cy, w, h
        out[4 + cls, i] = score
    return out


def test_nms_is_class_aware_and_filters_confidence() -> None:
    """NMS drops an overlapping box of the same class, keeps another class's, drops low scores."""
    pred = prediction(
        [
            (100, 100, 50, 50, 0, 0.9),
            (102, 101, 50, 50, 0, 0.8),  # same class, IoU ~0.9: suppressed
            (101, 100, 50, 50, 2, 0.7),  # other class at the same place: kept
            (300, 300, 20, 20, 0, 0.2),  # below conf 0.25
            (400, 100, 30, 30, 5, 0.6),
        ]
    )
    dets = compact.nms(pred, conf=0.25, iou=0.7)
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert dets[:, 5].tolist() == [0, 2, 5]
    assert dets[0, :4].tolist() == [75, 75, 125, 125]
    assert compact.nms(pred, conf=0.95, iou=0.7).shape == (0, 6)
    assert len(compact.nms(pred, conf=0.25, iou=0.7, max_det=2)) == 2


def test_scale_back_maps_to_the_original_image_and_clips() -> None:
    """Rows in network pixels go back through padding and gain and are clipped to the image."""
    placement = compact.Placement(480 / 810, 640 / 1080, 80, 0)
    dets = np.array([[80, 0, 560, 640, 0.5, 1], [0, 10, 700, 20, 0.4, 2]], dtype=np.float32)
    out = compact.scale_back(dets, placement, (1080, 810))
    assert out[0, :4] == pytest.approx([0, 0, 810, 1080], abs=1e-3)
    assert out[1, 0] == 0 and out[1, 2] == 810
    assert out[:, 4:].tolist() == dets[:, 4:].tolist()


def test_served_name_avoids_what_ultralytics_reads_as_a_file_format() -> None:
    """The default served name drops .onnx / _openvino_model and dots; export markers are refused."""
    assert options.served_name("yolov8n_int8_openvino_model") == SERVED
    assert options.served_name("yolov8n_int8.onnx") == SERVED
    assert options.served_name("v1.2 model") == "v1_2_model"
    with pytest.raises(SystemExit):
        options.parse_args("vision-triton", ["--model", "x", "--name", "x_ncnn_model"])


def test_launcher_without_triton_venv_says_how_to_make_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the Triton virtualenv vision-triton prints one line naming `make triton-venv`, exit 2."""
    monkeypatch.setenv("VISION_TRITON_PYTHON", "/nonexistent/bin/python")
    assert cli.main(["--model", MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert err == cli.VENV_HINT and "\n" not in err
