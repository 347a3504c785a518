"""Upstream model servers over HTTP: ``oip:`` (Open Inference Protocol / KServe V2 — Triton,
MLServer, KServe, safeshift's own gateway) and ``mlflow-server:`` (MLflow's scoring server,
``/invocations``; ``mlflow:`` is its older name, still accepted, and ``safeshift validate`` warns:
it read as if it named a registry model, which is ``models:/``, :mod:`safeshift.models.registry`).

References::

    oip:http://127.0.0.1:8080#churn            model "churn" on an OIP server
    mlflow-server:http://127.0.0.1:5000        an MLflow scoring server
    oip:http://models:8080?timeout=2&retries=3#churn

Options (URL query): ``timeout`` seconds per attempt (default 5), ``retries`` after a failure
to connect (default 2; never after a request was sent, so a slow model is not called twice),
``backoff`` seconds before the first retry, doubling (default 0.05).

Loading does not connect. Connections are pooled: an ``httpx.Client`` for ``predict`` and an
``httpx.AsyncClient`` (one per event loop) for ``apredict``. Every failure — refused
connection, timeout, HTTP error, a malformed answer — comes back as ``ModelResult(error=...)``.

Rows go out as the gateway takes them in: rows of named features become one OIP input per
feature (shape ``[N]``), or MLflow's ``dataframe_split``; rows of values become one input
``input`` of shape ``[N, k]``, or MLflow's ``inputs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx

from safeshift.errors import ModelLoadError
from safeshift.models import register_loader
from safeshift.models.base import ModelResult, Rows, oip_datatype, validate_result

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout)
REJECTED_INPUTS = (400, 422)
"""Upstream statuses that mean "these inputs cannot be read": reported like a local model's
``ValueError``, so that inputs the baseline's upstream rejects are the request's fault."""
_JSON = {"content-type": "application/json"}


class _Options:
    def __init__(self, query: str, ref: str) -> None:
        self.timeout = 5.0
        self.retries = 2
        self.backoff = 0.05
        for key, value in parse_qsl(query, keep_blank_values=True):
            try:
                if key == "timeout":
                    self.timeout = float(value)
                    ok = self.timeout > 0
                elif key == "retries":
                    self.retries = int(value)
                    ok = self.retries >= 0
                elif key == "backoff":
                    self.backoff = float(value)
                    ok = self.backoff >= 0
                else:
                    raise ModelLoadError(f"{ref}: unknown option {key!r}; use timeout, retries "
                                         "or backoff")
            except ValueError:
                ok = False
            if not ok:
                raise ModelLoadError(f"{ref}: option {key}={value!r} is not valid")


class HTTPModel:
    """Common machinery: pooled clients, retries on connection failures, errors as data."""

    path = "/"

    def __init__(self, base_url: str, *, name: str, timeout: float = 5.0, retries: int = 2,
                 backoff: float = 0.05, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.attempts = 0  # requests attempted (tests and metrics)
        self._transport = transport
        self._async_transport = async_transport
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return self.base_url + self.path

    # -- wire format (subclasses) ------------------------------------------------------

    def encode(self, rows: Rows) -> dict[str, Any]:
        raise NotImplementedError

    def decode(self, doc: Any, n_rows: int) -> tuple[list[Any], list[float] | None]:
        raise NotImplementedError

    # -- calls ---------------------------------------------------------------------------

    def _limits(self) -> httpx.Limits:
        return httpx.Limits(max_connections=64, max_keepalive_connections=32)

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout, limits=self._limits(),
                                        transport=self._transport)
        return self._client

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient = httpx.AsyncClient(timeout=self.timeout, limits=self._limits(),
                                              transport=self._async_transport)
            self._aclient_loop = loop
        return self._aclient

    def _payload(self, rows: Rows, start: float) -> bytes | ModelResult:
        try:
            return json.dumps(self.encode(rows), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            return ModelResult(error=f"cannot encode the rows for {self.name}: {exc}",
                               latency_ms=_ms(start))

    def predict(self, rows: Rows) -> ModelResult:
        start = time.perf_counter()
        payload = self._payload(rows, start)
        if isinstance(payload, ModelResult):
            return payload
        client = self._sync_client()
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                response = client.post(self.url, content=payload, headers=_JSON)
            except _RETRYABLE as exc:
                if attempt == self.retries:
                    return self._failed(exc, start)
                time.sleep(self.backoff * 2**attempt)
            except httpx.HTTPError as exc:
                return self._failed(exc, start)
            else:
                return self._answer(response, len(rows), start)
        raise AssertionError("unreachable")  # pragma: no cover

    async def apredict(self, rows: Rows) -> ModelResult:
        start = time.perf_counter()
        payload = self._payload(rows, start)
        if isinstance(payload, ModelResult):
            return payload
        client = self._async_client()
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                response = await client.post(self.url, content=payload, headers=_JSON)
            except _RETRYABLE as exc:
                if attempt == self.retries:
                    return self._failed(exc, start)
                await asyncio.sleep(self.backoff * 2**attempt)
            except httpx.HTTPError as exc:
                return self._failed(exc, start)
            else:
                return self._answer(response, len(rows), start)
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(self, exc: httpx.HTTPError, start: float) -> ModelResult:
        timed_out = isinstance(exc, httpx.TimeoutException)
        what = "timed out" if timed_out else "failed"
        detail = str(exc) or type(exc).__name__
        return ModelResult(error=f"{self.name}: request {what} ({type(exc).__name__}: "
                                 f"{detail})", timed_out=timed_out, latency_ms=_ms(start))

    def _answer(self, response: httpx.Response, n_rows: int, start: float) -> ModelResult:
        if response.status_code != 200:
            text = response.text[:300].strip()
            if response.status_code in REJECTED_INPUTS:  # as a local model's ValueError: the
                # inputs' fault when the baseline says it (safeshift.serving)
                return ModelResult(error=f"ValueError: {self.name}: upstream rejected the inputs "
                                         f"(HTTP {response.status_code}): {text}",
                                   latency_ms=_ms(start))
            return ModelResult(error=f"{self.name}: upstream answered HTTP "
                                     f"{response.status_code}: {text}", latency_ms=_ms(start))
        try:
            outputs, scores = self.decode(response.json(), n_rows)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return ModelResult(error=f"{self.name}: malformed answer ({exc})",
                               latency_ms=_ms(start))
        if scores is not None and len(scores) != len(outputs):
            scores = None
        return validate_result(ModelResult(outputs=outputs, scores=scores,
                                           latency_ms=_ms(start)), n_rows)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        aclient, loop = self._aclient, self._aclient_loop
        self._aclient = self._aclient_loop = None
        if aclient is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop.is_running() and running is not loop:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(aclient.aclose(), loop).result(timeout=2)

    async def aclose(self) -> None:
        """Close the async client from its own event loop (the gateway does at shutdown)."""
        aclient = self._aclient
        if aclient is not None and self._aclient_loop is asyncio.get_running_loop():
            self._aclient = self._aclient_loop = None
            await aclient.aclose()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


# -- Open Inference Protocol ----------------------------------------------------------------


class OIPModel(HTTPModel):
    """A model on an Open Inference Protocol server: ``POST /v2/models/{model}/infer``."""

    def __init__(self, base_url: str, model: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"oip:{base_url}#{model}")
        super().__init__(base_url, **kwargs)
        self.model = model
        self.path = f"/v2/models/{model}/infer"

    @classmethod
    def parse(cls, spec: str) -> OIPModel:
        base, query, fragment = _split(spec, f"oip:{spec}")
        if not fragment:
            raise ModelLoadError(f"oip:{spec}: name the model after '#', e.g. "
                                 "oip:http://127.0.0.1:8080#churn")
        opts = _Options(query, f"oip:{spec}")
        return cls(base, fragment, timeout=opts.timeout, retries=opts.retries,
                   backoff=opts.backoff)

    def encode(self, rows: Rows) -> dict[str, Any]:
        n = len(rows)
        if n and all(isinstance(r, dict) for r in rows):
            names = list(rows[0])
            inputs = []
            for name in names:
                dtype, data = oip_datatype([r[name] for r in rows])
                inputs.append({"name": name, "shape": [n], "datatype": dtype, "data": data})
            return {"inputs": inputs}
        if n and all(isinstance(r, list | tuple) for r in rows):
            width = len(rows[0])
            if any(len(r) != width for r in rows):
                raise ValueError("rows of different lengths")
            dtype, data = oip_datatype([v for r in rows for v in r])
            return {"inputs": [{"name": "input", "shape": [n, width], "datatype": dtype,
                                "data": data}]}
        dtype, data = oip_datatype(list(rows))
        return {"inputs": [{"name": "input", "shape": [n], "datatype": dtype, "data": data}]}

    def decode(self, doc: Any, n_rows: int) -> tuple[list[Any], list[float] | None]:
        tensors = {t["name"]: t for t in doc["outputs"]}
        if not tensors:
            raise ValueError("no outputs")
        main = next((tensors[k] for k in ("output", "predict", "prediction") if k in tensors),
                    doc["outputs"][0])
        outputs = _unflatten(main)
        scores = None
        for key in ("score", "scores", "probability"):
            if key in tensors and key != main["name"]:
                scores = [float(v) for v in _flat(tensors[key]["data"])]
                break
        return outputs, scores


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [v for item in data for v in _flat(item)]
    return list(data)


def _unflatten(tensor: dict[str, Any]) -> list[Any]:
    if "data" not in tensor:
        raise ValueError(f"output {tensor.get('name')!r} has no data (binary answers are not "
                         "supported)")
    data = _flat(tensor["data"])
    dtype = str(tensor.get("datatype", ""))
    if dtype.startswith("FP"):
        data = [float(v) for v in data]  # servers may write NaN as the string "NaN"
    elif dtype.startswith(("INT", "UINT")):
        data = [int(v) for v in data]
    shape = [int(d) for d in tensor["shape"]]
    if len(shape) <= 1 or math.prod(shape[1:]) == 1:
        return data
    width = math.prod(shape[1:])
    return [data[i * width:(i + 1) * width] for i in range(shape[0])]


# -- MLflow ---------------------------------------------------------------------------------


class MLflowModel(HTTPModel):
    """An MLflow scoring server: ``POST /invocations``."""

    path = "/invocations"

    @classmethod
    def parse(cls, spec: str, scheme: str = "mlflow-server") -> MLflowModel:
        base, query, fragment = _split(spec, f"{scheme}:{spec}")
        if fragment:
            raise ModelLoadError(f"{scheme}:{spec}: an MLflow server serves one model; drop "
                                 f"'#{fragment}'")
        opts = _Options(query, f"{scheme}:{spec}")
        return cls(base, name=f"{scheme}:{base}", timeout=opts.timeout, retries=opts.retries,
                   backoff=opts.backoff)

    def encode(self, rows: Rows) -> dict[str, Any]:
        if rows and all(isinstance(r, dict) for r in rows):
            columns = list(rows[0])
            return {"dataframe_split": {"columns": columns,
                                        "data": [[r[c] for c in columns] for r in rows]}}
        return {"inputs": list(rows)}

    def decode(self, doc: Any, n_rows: int) -> tuple[list[Any], list[float] | None]:
        predictions = doc["predictions"] if isinstance(doc, dict) else doc
        if not isinstance(predictions, list):
            raise ValueError("'predictions' is not a list")
        return predictions, None


def _split(spec: str, ref: str) -> tuple[str, str, str]:
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ModelLoadError(f"{ref}: give an http(s) URL, e.g. http://127.0.0.1:8080")
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return base, parts.query, parts.fragment


def _load_oip(spec: str, base_dir: Path) -> OIPModel:
    return OIPModel.parse(spec)


def _load_mlflow_server(spec: str, base_dir: Path) -> MLflowModel:
    return MLflowModel.parse(spec)


def _load_mlflow_old(spec: str, base_dir: Path) -> MLflowModel:
    return MLflowModel.parse(spec, scheme="mlflow")


register_loader("oip", _load_oip)
register_loader("mlflow-server", _load_mlflow_server)
register_loader("mlflow", _load_mlflow_old)  # the older name: validate warns (plan_warnings)

__all__ = ["HTTPModel", "MLflowModel", "OIPModel"]
