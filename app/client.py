"""A small HTTP client for the SlimServe API, used by the `slimserve` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class ServerError(Exception):
    """The server answered with an error; the message is the server's own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SlimServeClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SlimServeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise ServerError(response.status_code, f"{response.status_code}: {message}")
        return response.json() if response.content else None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._json(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise ServerError(0, f"cannot reach {self.url}: {exc}") from None

    def upload(self, file: Path, name: str, samples: Path | None, compress: str | None,
               input_shapes: str | None = None) -> Any:
        data = {"name": name, **({"compress": compress} if compress else {}),
                **({"input_shapes": input_shapes} if input_shapes else {})}
        with open(file, "rb") as model:
            files: dict[str, Any] = {"file": (file.name, model)}
            if samples is None:
                return self.request("POST", "/models", data=data, files=files)
            with open(samples, "rb") as sample_file:
                files["samples"] = (samples.name, sample_file)
                return self.request("POST", "/models", data=data, files=files)

    def compress(self, model: str, body: dict[str, Any]) -> Any:
        return self.request("POST", f"/models/{model}/compressions", json=body)

    def job(self, job_id: str) -> Any:
        return self.request("GET", f"/jobs/{job_id}")

    def jobs(self, model: str | None = None) -> Any:
        return self.request("GET", "/jobs", params={"model": model} if model else None)["jobs"]

    def models(self) -> Any:
        return self.request("GET", "/models")["models"]

    def model(self, name: str) -> Any:
        return self.request("GET", f"/models/{name}")

    def predict(self, model: str, inputs: dict[str, Any], variant: str | None = None) -> Any:
        body: dict[str, Any] = {"inputs": inputs}
        if variant:
            body["variant"] = variant
        return self.request("POST", f"/models/{model}/predict", json=body)

    def route(self, model: str, routing: dict[str, Any]) -> Any:
        return self.request("PUT", f"/models/{model}/routing", json=routing)
