"""The compact wire format as a Triton Python-backend model, for NVIDIA's Triton container.

`image` (JPEG/PNG bytes) or `pixels` (a BGR frame) and optional `thresholds` (conf, iou) come in;
`detections` rows (x1, y1, x2, y2, conf, class_id) in the frame's pixels go out. Pre- and
post-processing are `compact.py` (copied beside this file by `python -m triton_serve.repository`,
the same code `vision-triton` runs); the network runs in the float32 model named by the
`fp32_model` parameter (ONNX Runtime or TensorRT on the GPU), called through Triton's BLS.
"""

from __future__ import annotations

import json
from typing import Any

import compact  # type: ignore[import-not-found]  # beside this file in the model's version folder
import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]


class TritonPythonModel:
    """One instance per `instance_group` count; Triton calls `execute` with a list of requests."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.fp32_model = params["fp32_model"]
        self.imgsz = int(params.get("imgsz", "640"))
        self.batched = params.get("fp32_batched", "false") == "true"

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        try:
            image_in = pb_utils.get_input_tensor_by_name(request, "image")
            pixels_in = pb_utils.get_input_tensor_by_name(request, "pixels")
            if (image_in is None) == (pixels_in is None):
                raise compact.BadImageError(
                    "send exactly one of the inputs 'image' (encoded bytes) and 'pixels' (BGR frame)"
                )
            if image_in is not None:
                image = compact.decode(image_in.as_numpy())
            else:
                image = compact.check_pixels(pixels_in.as_numpy())
            conf, iou = 0.25, 0.7
            thresholds = pb_utils.get_input_tensor_by_name(request, "thresholds")
            if thresholds is not None:
                conf, iou = (float(v) for v in thresholds.as_numpy().reshape(-1)[:2])
            padded, placement = compact.letterbox(image, self.imgsz)
            tensor = compact.to_input(padded)[None]  # [1, 3, S, S]
            answer = pb_utils.InferenceRequest(
                model_name=self.fp32_model,
                requested_output_names=["output0"],
                inputs=[pb_utils.Tensor("images", tensor)],
            ).exec()
            if answer.has_error():
                raise RuntimeError(answer.error().message())
            raw = pb_utils.get_output_tensor_by_name(answer, "output0").as_numpy()[0]
            rows = compact.detect_postprocess(raw, placement, image.shape[:2], conf, iou)
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("detections", rows.astype(np.float32))]
            )
        except Exception as exc:  # this request fails; the instance goes on
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
