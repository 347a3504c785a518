"""The Open Inference Protocol (KServe V2) on the wire: requests in JSON or with the binary
tensor data extension, responses in JSON or binary, errors as ``{"error": "..."}``.

Tensors become model rows batch-first:

- one input of shape ``[N, ...]``: ``N`` rows, each the rest of the tensor as a (nested) list
  (``[N, 30]`` gives 30 values a row); of shape ``[N]``: ``N`` scalar rows (e.g. texts);
- several inputs: each is a column of shape ``[N]`` (or ``[N, 1]``) and row ``i`` is the
  mapping ``{input name: value i}`` — the shape for models that name their features.

The answer is an ``output`` tensor (one value per row; ``[N, k]`` when each row's output is a
list) and, when the model gives scores, a ``score`` tensor (``FP64 [N]``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safeshift.gateway._http import HTTPError, dumps
from safeshift.gateway.bodies import load_json
from safeshift.models.base import oip_datatype

DTYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
BYTES = "BYTES"
HEADER_LENGTH = "inference-header-content-length"


def _fail(message: str, field: str | None = None, status: int = 422) -> HTTPError:
    return HTTPError(status, message, field=field)


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray[Any, Any] | list[Any]  # numeric: ndarray of ``shape``; BYTES: flat list


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0] if self.inputs[0].shape else 1


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an inference request; raises :class:`HTTPError` (422) naming the bad field."""
    blob = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _fail("Inference-Header-Content-Length must be an integer",
                        "Inference-Header-Content-Length") from None
        if n < 0 or n > len(body):
            raise _fail(f"Inference-Header-Content-Length {n} is outside the body "
                        f"({len(body)} bytes)", "Inference-Header-Content-Length")
        body, blob = body[:n], body[n:]
    doc = load_json(body, "an inference request object")
    if not isinstance(doc, dict):
        raise _fail("the request must be a JSON object with 'inputs'", "body")
    rid = doc.get("id")
    if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= 128):
        raise _fail("'id' must be a string of 1 to 128 characters", "id")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail("'parameters' must be an object", "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("'inputs' must be a non-empty list of tensors", "inputs")
    offset = 0
    inputs = []
    for i, raw in enumerate(raw_inputs):
        tensor, offset = _parse_tensor(raw, f"inputs[{i}]", blob, offset)
        inputs.append(tensor)
    if offset != len(blob):
        raise _fail(f"binary data has {len(blob) - offset} bytes that no input claims",
                    "inputs")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise _fail("input names must be unique", "inputs")
    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise _fail("'outputs' must be a list", "outputs")
        outputs = []
        for i, out in enumerate(raw_outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _fail("each requested output needs a 'name'", f"outputs[{i}].name")
            oparams = out.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise _fail("'parameters' must be an object", f"outputs[{i}].parameters")
            binary = oparams.get("binary_data")
            outputs.append(RequestedOutput(out["name"], bool(binary) if binary is not None
                                           else None))
    return InferRequest(rid, inputs, outputs, params, bool(params.get("binary_data_output")))


def _parse_tensor(raw: Any, where: str, blob: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(raw, dict):
        raise _fail("each input must be an object with name, shape, datatype and data", where)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _fail("'name' must be a non-empty string", f"{where}.name")
    dtype = raw.get("datatype")
    if not isinstance(dtype, str) or (dtype != BYTES and dtype not in DTYPES):
        raise _fail(f"unknown datatype {dtype!r}; use one of {', '.join([*DTYPES, BYTES])}",
                    f"{where}.datatype")
    shape = raw.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _fail("'shape' must be a non-empty list of non-negative integers",
                    f"{where}.shape")
    count = math.prod(shape)
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail("'parameters' must be an object", f"{where}.parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise _fail("binary_data_size does not fit the binary data that follows the "
                        "header", f"{where}.parameters.binary_data_size")
        chunk = blob[offset:offset + size]
        offset += size
        values: np.ndarray[Any, Any] | list[Any]
        if dtype == BYTES:
            values = _unpack_bytes(chunk, count, where)
        else:
            item = np.dtype(DTYPES[dtype]).itemsize
            if size != count * item:
                raise _fail(f"{size} bytes of binary data for {count} {dtype} values "
                            f"(expected {count * item})", f"{where}.parameters.binary_data_size")
            values = np.frombuffer(chunk, dtype=DTYPES[dtype]).reshape(shape)
        return Tensor(name, dtype, shape, values), offset
    if "data" not in raw:
        raise _fail("'data' is required (or binary data with parameters.binary_data_size)",
                    f"{where}.data")
    if not isinstance(raw["data"], list):
        raise _fail("'data' must be a list (flat or nested, row-major)", f"{where}.data")
    flat = _flatten(raw["data"])
    if len(flat) != count:
        raise _fail(f"shape {shape} needs {count} values, got {len(flat)}", f"{where}.data")
    kinds = set(map(type, flat))  # checked type by type: a tensor holds one or two
    if dtype == BYTES:
        if not all(issubclass(k, str) for k in kinds):
            raise _fail("BYTES data must be strings", f"{where}.data")
        return Tensor(name, dtype, shape, flat), offset
    if dtype == "BOOL":
        ok = all(issubclass(k, bool) for k in kinds)
    else:
        ok = all(issubclass(k, int | float) and not issubclass(k, bool) for k in kinds)
    if not ok:
        raise _fail(f"{dtype} data must be {'booleans' if dtype == 'BOOL' else 'numbers'}",
                    f"{where}.data")
    try:
        array = np.asarray(flat, dtype=DTYPES[dtype]).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise _fail(f"data does not fit {dtype}: {exc}", f"{where}.data") from None
    return Tensor(name, dtype, shape, array), offset


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        if any(issubclass(k, list) for k in set(map(type, data))):
            return [v for item in data for v in _flatten(item)]
        return data
    return [v for item in data for v in _flatten(item)]


def _unpack_bytes(chunk: bytes, count: int, where: str) -> list[Any]:
    out: list[Any] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise _fail("truncated BYTES element", f"{where}.parameters.binary_data_size")
        (n,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        raw = chunk[pos:pos + n]
        if len(raw) != n:
            raise _fail("truncated BYTES element", f"{where}.parameters.binary_data_size")
        pos += n
        try:
            out.append(raw.decode())
        except UnicodeDecodeError:
            out.append(raw.decode("latin-1"))
    if len(out) != count:
        raise _fail(f"{len(out)} BYTES elements for {count} in the shape", where)
    return out


OUTPUT_NAMES = ("output", "score")


def check_outputs(request: InferRequest) -> None:
    """Refuse requested outputs that no model here produces, before any model is called."""
    for i, out in enumerate(request.outputs or ()):
        if out.name not in OUTPUT_NAMES:
            raise _fail(f"unknown output {out.name!r}; the outputs are "
                        f"{', '.join(OUTPUT_NAMES)}", f"outputs[{i}].name", status=400)


def to_rows(inputs: Sequence[Tensor]) -> list[Any]:
    """Model rows from input tensors (see the module docstring for the convention)."""
    if len(inputs) == 1:
        t = inputs[0]
        if isinstance(t.values, np.ndarray):
            return list(t.values.tolist())
        if len(t.shape) == 1:
            return list(t.values)
        return list(np.asarray(t.values, dtype=object).reshape(t.shape).tolist())
    n = inputs[0].shape[0]
    columns: list[tuple[str, list[Any]]] = []
    for i, t in enumerate(inputs):
        if t.shape[0] != n or math.prod(t.shape) != n:
            raise _fail(f"input {t.name!r} has shape {t.shape}; with several inputs each must "
                        f"be a column of shape [{n}] or [{n}, 1]", f"inputs[{i}].shape")
        flat = t.values.reshape(-1).tolist() if isinstance(t.values, np.ndarray) else t.values
        columns.append((t.name, flat))
    return [{name: col[i] for name, col in columns} for i in range(n)]


# -- responses ------------------------------------------------------------------------------


def _output_tensor(name: str, values: Sequence[Any]) -> tuple[str, list[int], list[Any]]:
    n = len(values)
    if n and all(isinstance(v, list) for v in values):
        widths = {len(v) for v in values}
        if len(widths) == 1:
            flat = [x for v in values for x in v]
            dtype, data = oip_datatype(flat)
            return dtype, [n, widths.pop()], data
    dtype, data = oip_datatype(list(values))
    return dtype, [n], data


def output_datatype(outputs: Sequence[Any]) -> str:
    """The datatype of the ``output`` tensor that answers ``outputs``."""
    return _output_tensor("output", outputs)[0]


def _pack(dtype: str, data: list[Any]) -> bytes:
    if dtype == BYTES:
        parts = []
        for v in data:
            raw = v.encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.asarray(data, dtype=DTYPES[dtype]).tobytes()


def encode_response(*, model_name: str, model_version: str, request_id: str,
                    outputs: Sequence[Any], scores: Sequence[float] | None,
                    request: InferRequest, parameters: Mapping[str, Any]
                    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The response body and its extra headers (the binary extension's header, if used)."""
    available: dict[str, tuple[str, list[int], list[Any]]] = {
        "output": _output_tensor("output", outputs)}
    if scores is not None:
        available["score"] = ("FP64", [len(scores)], [float(s) for s in scores])
    wanted = request.outputs
    if wanted is None:
        wanted = [RequestedOutput(n) for n in available]
    for i, out in enumerate(wanted):
        if out.name not in available:
            raise _fail(f"unknown output {out.name!r}; this model has "
                        f"{', '.join(available)}", f"outputs[{i}].name", status=400)
    tensors = []
    blobs = []
    for out in wanted:
        dtype, shape, data = available[out.name]
        binary = request.binary_output if out.binary is None else out.binary
        if binary:
            blob = _pack(dtype, data)
            blobs.append(blob)
            tensors.append({"name": out.name, "datatype": dtype, "shape": shape,
                            "parameters": {"binary_data_size": len(blob)}})
        else:
            tensors.append({"name": out.name, "datatype": dtype, "shape": shape, "data": data})
    doc = {"model_name": model_name, "model_version": model_version, "id": request_id,
           "parameters": dict(parameters), "outputs": tensors}
    head = dumps(doc)
    if not blobs:
        return head, [(b"content-type", b"application/json")]
    return head + b"".join(blobs), [
        (b"content-type", b"application/octet-stream"),
        (HEADER_LENGTH.encode(), str(len(head)).encode())]


def unit_and_context(request: InferRequest, headers: Sequence[tuple[bytes, bytes]]
                     ) -> tuple[str | None, dict[str, Any] | None]:
    """The unit and context from ``parameters`` (``unit``, ``context`` or ``context.<attr>``),
    else from ``X-Safeshift-Unit`` and ``X-Safeshift-Context-<attr>`` headers."""
    unit: str | None = None
    context: dict[str, Any] = {}
    prefix = b"x-safeshift-context-"
    for key, value in headers:
        if key == b"x-safeshift-unit":
            unit = bytes(value).decode("latin-1")
        elif key.startswith(prefix) and len(key) > len(prefix):
            context[bytes(key[len(prefix):]).decode("latin-1")] = bytes(value).decode("latin-1")
    params = request.parameters
    if "unit" in params:
        raw = params["unit"]
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            raise _fail("'unit' must be a string", "parameters.unit")
        unit = str(raw)
    ctx = params.get("context")
    if ctx is not None:
        if not isinstance(ctx, dict):
            raise _fail("'context' must be an object of attribute values", "parameters.context")
        context.update(ctx)
    for name, value in params.items():
        if name.startswith("context.") and len(name) > 8:
            context[name[8:]] = value
    for name, value in context.items():
        if isinstance(value, dict | list):
            raise _fail("context values must be strings, numbers or booleans",
                        f"parameters.context.{name}")
    return unit, context or None
