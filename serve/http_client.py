"""A client of Relay's HTTP videos API (``relay serve --http-port``), on the standard library
only: part of the ``wan-relay[client]`` install (no torch, no Ray), used by the ComfyUI node
(``comfyui/``) and by studio scripts::

    from relay.serve.http_client import RelayHttp

    client = RelayHttp("http://gpu-node:8080", token="...")
    job = client.create({"prompt": "a red kite", "size": "832x480", "seconds": 5})
    for kind, data in client.events(job["id"]):
        ...
    mp4 = client.content(job["id"])
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request


class RelayError(RuntimeError):
    """An error answer of the server: HTTP status, the offending field and the message."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"Relay {status}: {message}")
        self.status, self.field, self.message = status, field, message


class RelayHttp:
    """Calls one Relay server.

    Args:
        server: ``http(s)://host:port`` of ``relay serve --http-port``.
        token: Bearer token, when the server requires one.
        timeout: Seconds per call (event streams wait longer between events: the heartbeat).
    """

    def __init__(self, server: str, token: str = "", timeout: float = 60.0) -> None:
        self.base = server.rstrip("/")
        if "://" not in self.base:
            self.base = "http://" + self.base
        self.token, self.timeout = token.strip(), timeout
        self._context = ssl.create_default_context() if self.base.startswith("https://") else None

    def _request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout, context=self._context)
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read().decode())["error"]
                raise RelayError(exc.code, error.get("message", ""), error.get("field")) from None
            except (ValueError, KeyError):
                raise RelayError(exc.code, exc.reason) from None

    def create(self, body: dict) -> dict:
        """``POST /v1/videos``: the new video job."""
        with self._request("POST", "/v1/videos", body) as response:
            return json.loads(response.read())

    def get(self, video_id: str) -> dict:
        """``GET /v1/videos/{id}``."""
        with self._request("GET", f"/v1/videos/{video_id}") as response:
            return json.loads(response.read())

    def cancel(self, video_id: str) -> dict:
        """``DELETE /v1/videos/{id}``: cancels the job."""
        with self._request("DELETE", f"/v1/videos/{video_id}") as response:
            return json.loads(response.read())

    def content(self, video_id: str) -> bytes:
        """``GET /v1/videos/{id}/content``: the finished file."""
        with self._request("GET", f"/v1/videos/{video_id}/content", timeout=max(self.timeout, 300)) as response:
            return response.read()

    def audio(self, video_id: str) -> bytes | None:
        """``GET /v1/videos/{id}/content?variant=audio``: the sound of an ``npy`` job of a model
        with sound, as a WAV file; ``None`` when there is none (a silent model)."""
        try:
            with self._request("GET", f"/v1/videos/{video_id}/content?variant=audio",
                               timeout=max(self.timeout, 300)) as response:
                return response.read()
        except RelayError as exc:
            if exc.status == 404 and exc.field == "variant":
                return None
            raise

    def events(self, video_id: str):
        """``GET /v1/videos/{id}/events``: yields ``(kind, data)`` until the terminal event;
        keep-alive comments yield ``("keepalive", None)`` so a caller can check for interrupts."""
        with self._request("GET", f"/v1/videos/{video_id}/events", timeout=max(self.timeout, 120)) as response:
            kind, data = None, []
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    yield "keepalive", None
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and kind is not None:
                    payload = json.loads("".join(data)) if data else {}
                    yield kind, payload
                    if kind in ("done", "failed", "cancelled"):
                        return
                    kind, data = None, []
