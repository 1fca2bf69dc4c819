"""A user's model file (``--model PATH``) made into an engine: OpenVINO on the CPU, whatever the format.

The file is read once (:func:`imgvec.backbones.modelfile.read_model_file`: bounded, hashed, checked), and
those bytes are what OpenVINO reads: ONNX and IR with ``Core.read_model`` from memory, a ``.keras`` file
through Keras (safe mode) and ``openvino.convert_model``, cached like a registry backbone
(:func:`imgvec.runtime.model_cache.keras_file_model`). Before anything is reshaped or compiled, the input
the model claims is checked: one input, rank 4, three channels first (NCHW) or last (NHWC), square, at most
:data:`imgvec.checks.MAX_IMAGE_SIZE`. Then the model is wrapped as every engine is: uint8 NHWC pixels in
(the stated preprocessing and the layout change done by OpenVINO's PrePostProcessor), the embedding out
(the output, or ``layer``; global-average-pooled when 4-D, over the spatial axes of the input's layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgvec.backbones.modelfile import ModelBytes, ModelFileSpec, read_model_file
from imgvec.checks import MAX_IMAGE_SIZE
from imgvec.errors import BadInputError, param
from imgvec.runtime.model_cache import keras_file_model
from imgvec.runtime.openvino_engine import OpenVINOEngine

MIN_MODEL_SIZE = 8  # px: the smallest square input a model file may take


@dataclass(frozen=True)
class PreparedModel:
    """A model file ready to compile: uint8 ``(n, s, s, 3)`` pixels in, ``(n, dim)`` float32 out."""

    spec: ModelFileSpec
    model: Any = field(repr=False)  # openvino.Model
    image_size: int
    dim: int
    batch: int | None  # the batch size the model fixes; None: any
    layout: str  # NHWC | NCHW, of the model's own input
    input: str  # the input as read from the file, for provenance
    output: str  # which output, its shape, pooled or not, for provenance
    source: ModelBytes = field(repr=False)  # the bytes OpenVINO read (kept alive with the model)

    @property
    def sha256(self) -> str:
        return self.source.sha256


def _dims(pshape: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in pshape]


def _shape_text(dims: list[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _read(source: ModelBytes, spec: ModelFileSpec) -> Any:
    import openvino as ov

    core = ov.Core()
    try:
        if source.format == "keras":
            converted = keras_file_model(source, spec.layer)
            return converted if isinstance(converted, ov.Model) else core.read_model(str(converted))
        if source.format == "openvino":
            return core.read_model(source.data, source.weights)
        return core.read_model(source.data)
    except BadInputError:
        raise
    except Exception as error:  # OpenVINO's frontends raise RuntimeError and others
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise BadInputError(f"{source.path}: OpenVINO cannot read this {source.format} model ({first})") from None


def _input_spec(model: Any, source: ModelBytes, image_size: int | None) -> tuple[str, int, int | None, str]:
    """(layout, square size, fixed batch or None, description) of the one image input; refused unless sane."""
    params = model.get_parameters()
    if len(params) != 1:
        raise BadInputError(f"{source.path}: the model has {len(params)} inputs; imgvec feeds it one image batch")
    pshape = params[0].get_partial_shape()
    if pshape.rank.is_dynamic or pshape.rank.get_length() != 4:
        raise BadInputError(f"{source.path}: the model's input is {pshape}, not a 4-D image batch (NHWC or NCHW)")
    dims = _dims(pshape)
    last, first = dims[3] == 3, dims[1] == 3
    if last == first:
        raise BadInputError(f"{source.path}: cannot tell the channels of input {_shape_text(dims)}: imgvec takes "
                            "3-channel images, channels last (NHWC) or first (NCHW)")
    layout = "NHWC" if last else "NCHW"
    spatial = dims[1:3] if last else dims[2:4]
    fixed = {d for d in spatial if d is not None}
    if len(fixed) > 1:
        raise BadInputError(f"{source.path}: the model takes {spatial[0]}x{spatial[1]} images; imgvec embeds square "
                            "ones")
    size = next(iter(fixed), None)
    for d in fixed:
        if not MIN_MODEL_SIZE <= d <= MAX_IMAGE_SIZE:
            raise BadInputError(f"{source.path}: the model claims {d}x{d} px inputs, outside {MIN_MODEL_SIZE}.."
                                f"{MAX_IMAGE_SIZE}: forged or not an image model")
    if size is not None and image_size is not None and image_size != size:
        raise BadInputError(f"{param('image_size')} {image_size}: {source.name} takes {size}x{size} px images only")
    if size is None:
        if image_size is None:
            raise BadInputError(f"{source.name} takes images of any size: give {param('image_size')}")
        size = image_size
    if not MIN_MODEL_SIZE <= size <= MAX_IMAGE_SIZE:
        raise BadInputError(f"{param('image_size')} {size} is outside {MIN_MODEL_SIZE}..{MAX_IMAGE_SIZE}")
    batch = dims[0]
    described = f"{layout} {_shape_text(dims)} {params[0].get_element_type().get_type_name()}"
    return layout, size, batch, described


def _output(model: Any, source: ModelBytes, layer: str) -> Any:
    """The output to embed with: the model's only one, or the output or tensor named ``layer``."""
    outputs = model.outputs
    names = [sorted(o.get_names())[0] if o.get_names() else f"#{i}" for i, o in enumerate(outputs)]
    if layer and source.format != "keras":  # a .keras file's layer was taken in Keras already
        chosen = [o for o in outputs if layer in o.get_names()]
        if not chosen:
            try:
                chosen = model.add_outputs(layer)
            except Exception:
                raise BadInputError(f"{param('layer')} {layer!r}: {source.name} has no output or tensor of that name "
                                    f"(outputs: {', '.join(names)})") from None
        out = chosen[0]
    elif len(outputs) != 1:
        raise BadInputError(f"{source.name} has {len(outputs)} outputs ({', '.join(names[:8])}): pick the "
                            f"embedding with {param('layer')} NAME")
    else:
        out = outputs[0]
    node = out.get_node()
    return node.input_value(0) if node.get_type_name() == "Result" else out


def _reshaped(model: Any, source: ModelBytes, layout: str, size: int, batch: int | None) -> int | None:
    """Reshape to ``size`` px with any batch; a model that only runs with its own batch keeps it. The batch used."""
    param_ = model.get_parameters()[0]

    def shape(n: int) -> list[int]:
        return [n, size, size, 3] if layout == "NHWC" else [n, 3, size, size]

    try:
        model.reshape({param_.output(0): shape(-1)})
        if all(o.get_partial_shape().rank.is_static and o.get_partial_shape()[0].is_dynamic for o in model.outputs):
            return None
    except Exception:
        pass
    if batch is None:
        batch = 1
    try:
        model.reshape({param_.output(0): shape(batch)})
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise BadInputError(f"{source.path}: does not run at {size}x{size} px ({first})") from None
    return batch


def prepare_model_file(spec: ModelFileSpec, image_size: int | None = None) -> PreparedModel:
    """Read, check and wrap ``spec``'s file (see the module's docstring). Raises :class:`BadInputError` for a
    model imgvec cannot run as asked, :class:`~imgvec.backbones.modelfile.ModelFileMismatch` for other bytes than
    ``spec.sha256`` pins."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.preprocess import PrePostProcessor

    source = read_model_file(spec)
    model = _read(source, spec)
    layout, size, batch, described = _input_spec(model, source, image_size)
    out = _output(model, source, spec.layer)
    name = sorted(out.get_names())[0] if out.get_names() else "output"
    rank = out.get_partial_shape().rank
    rank_n = rank.get_length() if rank.is_static else -1
    if rank_n not in (2, 4):
        raise BadInputError(f"{source.name}: output {name!r} is {out.get_partial_shape()}, neither (n, dim) nor a 4-D "
                            f"feature map to pool; pick another with {param('layer')} NAME")
    embedding = ops.reduce_mean(out, ops.constant(np.array([1, 2] if layout == "NHWC" else [2, 3], np.int64)),
                                keep_dims=False).output(0) if rank_n == 4 else out
    if embedding.get_element_type() != ov.Type.f32:
        embedding = ops.convert(embedding, "f32").output(0)
    model = ov.Model([embedding], model.get_parameters(), "imgvec-model-file")
    batch = _reshaped(model, source, layout, size, batch)
    dims = _dims(model.output(0).get_partial_shape())
    if len(dims) != 2 or dims[1] is None or not 0 < dims[1] <= 1 << 16:
        raise BadInputError(f"{source.name}: the embedding {name!r} has shape {_shape_text(dims)}; expected (n, dim) "
                            "with a fixed dim of at most 65536")
    output = f"{name!r} {_shape_text(_dims(out.get_partial_shape()))}" + (
        f", global-average-pooled over {'H,W'}" if rank_n == 4 else "")

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout(layout))
    steps = ppp.input().preprocess()
    pre = spec.preprocess
    steps.convert_element_type(ov.Type.f32)
    if pre.bgr:
        steps.reverse_channels()
    if any(m != 0 for m in pre.mean):
        steps.mean([255.0 * m for m in pre.mean])
    if any(not math.isclose(255.0 * s, 1.0) for s in pre.std):
        steps.scale([255.0 * s for s in pre.std])
    ppp.output().tensor().set_element_type(ov.Type.f32)
    return PreparedModel(spec, ppp.build(), size, int(dims[1]), batch, layout, described, output, source)


class ModelFileEngine(OpenVINOEngine):
    """A prepared model file compiled for the CPU (the streams of :class:`OpenVINOEngine`); a model that fixes
    its batch size gets exactly that many images per request (the last padded). ``model``: another form of the
    prepared model to compile (its int8 quantization)."""

    def __init__(self, prepared: PreparedModel, precision: str, device: str, model: Any = None) -> None:
        if device == "gpu":
            raise BadInputError(f"a model file runs on OpenVINO on the CPU; leave out {param('device')} gpu")
        import openvino as ov

        compiled = ov.Core().compile_model(prepared.model if model is None else model, "CPU", self.config(precision))
        self._start(compiled, prepared.dim)
        self._batch = prepared.batch
        if self._batch:
            self.model_batch = self._batch * self._streams

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if not self._batch:
            return super().__call__(pixels)
        n, b = len(pixels), self._batch
        padded = np.zeros((-(-n // b) * b, *pixels.shape[1:]), np.uint8)
        padded[:n] = pixels
        out = np.empty((len(padded), self._dim), np.float32)
        with self._lock:
            for start in range(0, len(padded), b):
                self._queue.start_async([padded[start : start + b]], (out, start))
            self._queue.wait_all()
        return out[:n]
