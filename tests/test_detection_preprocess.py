"""mmdetection's test-time preprocessing on photos of odd sizes: the reference was made by
mmdetection 3.3's own pipeline (tests/reference/mmdet_preprocess/make_reference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pvt.detection.mmdet_compat import MMDetTransform

REF = Path(__file__).parent / "reference"
sys.path.insert(0, str(REF / "mmseg"))
from weights import make_image  # noqa: E402


def test_preprocessing_equals_mmdetection() -> None:
    ref = torch.load(REF / "mmdet_preprocess" / "preprocess.pt", weights_only=True)
    transform = MMDetTransform().eval()
    for case in ref["cases"]:
        image = torch.from_numpy(make_image(*case["size"], seed=case["image_seed"])).permute(2, 0, 1)
        images, _ = transform([image.float() / 255])  # this project's datasets give 0..1 floats
        # Resize rounding, padding to 32 and the scale factor: exactly mmdet's.
        assert images.image_sizes[0] == case["img_shape"], case["size"]
        assert tuple(images.tensors[0].shape) == case["batch_shape"], case["size"]
        h, w = case["img_shape"]
        factors = (w / case["size"][1], h / case["size"][0])
        assert factors == case["scale_factor"]
        # Values: mmcv resizes the uint8 image with OpenCV's fixed-point bilinear; MMDetTransform
        # does the same arithmetic (cv2_resize_linear_u8), so the network input is mmdet's exactly.
        got = images.tensors[0].flatten()[case["index"].long()]
        torch.testing.assert_close(got, case["values"], rtol=0, atol=0, msg=f"{case['size']}")
        pad = images.tensors[0][:, h:, :].abs().sum() + images.tensors[0][:, :, w:].abs().sum()
        assert pad == 0  # zero padding after normalisation
