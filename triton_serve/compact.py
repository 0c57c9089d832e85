"""Pre- and post-processing of the compact wire format as pure functions (numpy 1 or 2, cv2).

They reproduce what ultralytics does around a fixed-size detect model (LetterBox with auto=False,
non_max_suppression, scale_boxes) so the server can take an image and answer with detections in
the image's own pixels. They are written here rather than imported because the server runs in
the Triton virtualenv (numpy<2, no torch or ultralytics).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

PAD_VALUE = 114
MAX_DET = 300
MAX_NMS = 30000  # ultralytics' cap on boxes entering NMS
MAX_WH = 7680  # ultralytics' per-class box offset, so one NMS pass is class-aware

Image = NDArray[np.uint8]
Floats = NDArray[np.float32]


class BadImageError(ValueError):
    """The bytes or pixels sent are not an image the server can read."""


@dataclass(frozen=True)
class Placement:
    """Where a letterboxed image sits in the network input: per-axis gain and top-left padding."""

    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int


def decode(data: NDArray[np.uint8]) -> Image:
    """Decode encoded image bytes (JPEG, PNG, ...) into a BGR HxWx3 array."""
    if data.size == 0:
        raise BadImageError("input 'image' is empty; send the encoded JPEG or PNG bytes")
    image = cv2.imdecode(np.ascontiguousarray(data.reshape(-1)), cv2.IMREAD_COLOR)
    if image is None:
        raise BadImageError("input 'image' could not be decoded; send JPEG or PNG bytes")
    return np.asarray(image, dtype=np.uint8)


def check_pixels(pixels: NDArray[np.uint8]) -> Image:
    """Accept a raw BGR HxWx3 uint8 frame with at least one pixel."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise BadImageError(
            f"input 'pixels' has shape {list(pixels.shape)}; send a BGR frame shaped [H, W, 3]"
        )
    return np.ascontiguousarray(pixels)


def letterbox(image: Image, size: int) -> tuple[Image, Placement]:
    """Resize keeping aspect ratio and pad to size x size like ultralytics' LetterBox(auto=False)."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    if (w, h) != (new_w, new_h):
        image = np.asarray(
            cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8
        )
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    padded = cv2.copyMakeBorder(
        image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return np.asarray(padded, dtype=np.uint8), Placement(new_w / w, new_h / h, left, top)


def to_input(padded: Image) -> Floats:
    """BGR HxWx3 uint8 -> RGB 3xHxW float32 in [0, 1], the model's input for one image."""
    chw = np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1))
    return chw.astype(np.float32) / np.float32(255.0)


def _iou_one_to_many(box: Floats, boxes: Floats) -> Floats:
    """IoU of one xyxy box against many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.asarray(inter / (area + areas - inter + 1e-9), dtype=np.float32)


def nms(
    prediction: Floats,
    conf: float,
    iou: float,
    max_det: int = MAX_DET,
    classes: NDArray[np.int64] | None = None,
) -> NDArray[np.float32]:
    """Raw detect output [4 + classes, anchors] -> rows (x1, y1, x2, y2, conf, class) after NMS.

    Class-aware greedy NMS as torchvision's: best class per anchor, conf strictly above the
    threshold, highest first; a box is dropped when its IoU with a kept box of its class exceeds
    iou. `classes` keeps only boxes whose best class is one of them, before NMS, as ultralytics'
    `classes=`. Written with numpy because torchvision is not in the Triton virtualenv.
    """
    class_scores = prediction[4:]  # classes x anchors, reduced along the contiguous rows
    keep_mask = class_scores.max(0) > conf
    if not keep_mask.any():
        return np.zeros((0, 6), dtype=np.float32)
    candidates = class_scores[:, keep_mask]
    cls = candidates.argmax(0)
    scores = candidates[cls, np.arange(cls.size)]
    xywh = prediction[:4, keep_mask].T
    if classes is not None:
        wanted = np.isin(cls, classes)
        xywh, scores, cls = xywh[wanted], scores[wanted], cls[wanted]
        if not cls.size:
            return np.zeros((0, 6), dtype=np.float32)
    boxes = np.empty_like(xywh)
    boxes[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    order = np.argsort(-scores, kind="stable")[:MAX_NMS]
    boxes, scores, cls = boxes[order], scores[order], cls[order]
    shifted = boxes + (cls[:, None] * MAX_WH).astype(np.float32)
    alive = np.ones(len(order), dtype=bool)
    kept: list[int] = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) >= max_det:
            break
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        if rest.size:
            alive[rest[_iou_one_to_many(shifted[i], shifted[rest]) > iou]] = False
    k = np.asarray(kept, dtype=np.intp)
    out = np.empty((k.size, 6), dtype=np.float32)
    out[:, :4], out[:, 4], out[:, 5] = boxes[k], scores[k], cls[k]
    return out


def scale_back(
    detections: NDArray[np.float32], placement: Placement, shape: tuple[int, int]
) -> NDArray[np.float32]:
    """Map rows from network-input pixels to the original image's (h, w) and clip to it."""
    out = detections.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - placement.pad_x) / placement.gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - placement.pad_y) / placement.gain_y
    h, w = shape
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def detect_postprocess(
    prediction: Floats, placement: Placement, shape: tuple[int, int], conf: float, iou: float
) -> NDArray[np.float32]:
    """NMS then scaling back: the compact model's answer for one image.

    pytriton 0.7 cannot send an empty tensor ("cannot cast view with zeros in shape"), so an image
    without detections answers one all-zero row: a row with conf 0 is never a detection.
    """
    rows = scale_back(nms(prediction, conf, iou), placement, shape)
    return rows if len(rows) else np.zeros((1, 6), dtype=np.float32)
