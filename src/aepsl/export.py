"""`aepsl export`: the trained segmentation network as an ONNX file, for ONNX Runtime,
TensorRT and other deployment runtimes.

The graph takes images as float32 (N, 3, H, W) in [0, 1], RGB, any batch and size (the network
normalises them itself), and gives the class probabilities (N, C+1, H, W) at the input's size
and the labels (N, H, W) uint8 (0 background, k class k). What `aepsl predict` adds around the
network is left to the caller and recorded in the file's metadata: the size the network was
trained at (`input_size`, `input_min_side`: resize the image by `input_scale` first) and the
class count. Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aepsl.config import Config
from aepsl.errors import UserError
from aepsl.io import atomic_path
from aepsl.layout import as_out
from aepsl.models.segnet import SegNet, load_segnet

OPSET = 18
INPUT, OUTPUTS = "images", ("probabilities", "labels")


class ExportedSegNet(nn.Module):
    """The network with its scores upsampled to the input's size, softmax and argmax."""

    def __init__(self, model: SegNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, _ = self.model(images)
        scores = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
        probs = scores.softmax(dim=1)
        return probs, probs.argmax(dim=1).to(torch.uint8)


def export_onnx(
    checkpoint: str | os.PathLike, out: str | os.PathLike, config: Config | None = None
) -> Path:
    """Write `checkpoint`'s network to `out` as ONNX (dynamic batch, height and width), written
    to a temporary name and renamed; returns the path. `config` builds a model file of an
    earlier version (without its settings)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the 'onnx' extra: pip install 'aepsl[onnx]'") from None
    out = as_out(out)
    if out.is_dir():
        raise UserError(f"{out}: --out is a folder; name the ONNX file to write (model.onnx)")
    if out.resolve() == Path(checkpoint).resolve():
        raise UserError(f"{out}: --out is the checkpoint itself; write the ONNX file elsewhere")
    model = load_segnet(checkpoint, config).eval()
    wrapped = ExportedSegNet(model).eval()
    example = torch.rand(1, 3, 64, 80)
    batch, height, width = (torch.export.Dim(n, min=1) for n in ("batch", "height", "width"))
    with atomic_path(out, suffix=".onnx") as tmp:
        program = torch.onnx.export(
            wrapped,
            (example,),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        program.save(str(tmp))
        saved = onnx.load(str(tmp))
        metadata = {
            "producer": "aepsl",
            "classes": str(model.classifier.out_channels - 1),
            "input_size": str(getattr(model, "input_size", 0)),
            "input_min_side": str(getattr(model, "input_min_side", 0)),
            "input": "float32 (N, 3, H, W) RGB in [0, 1]",
        }
        for key, value in metadata.items():
            saved.metadata_props.add(key=key, value=value)
        onnx.save(saved, str(tmp))
    return out
