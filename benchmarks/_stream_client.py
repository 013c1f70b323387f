"""The lean blocking streaming client of the serving benchmarks (serve_few_clients.py,
serve_one_client_ab.py): http.client, one socket, no SDK, so its own CPU cost stays out of the
figures. Imported as a sibling module by scripts run as `python benchmarks/<name>.py`."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field


@dataclass
class Stream:
    """When the events of one streamed completion arrived (perf_counter seconds)."""

    start: float
    """Before the request was sent."""
    end: float = 0.0
    """After the stream ended."""
    events: list[float] = field(default_factory=list)
    """Every `data:` chunk but [DONE]."""
    tokens: list[float] = field(default_factory=list)
    """The chunks that carry text (not a finish-only or usage-only chunk)."""
    usage_tokens: int | None = None
    """completion_tokens of the usage chunk, where the server sent one."""


def stream_completion(port: int, body: dict[str, object], timeout: float) -> Stream:
    """POST a streamed /v1/completions `body` to 127.0.0.1:`port` and time its chunks; raises
    RuntimeError on a non-200 answer."""
    stream = Stream(start=time.perf_counter())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status} from port {port}: {resp.read()[:300]!r}")
    while True:
        line = resp.fp.readline()
        if not line or line.startswith(b"data: [DONE]"):
            break
        if not line.startswith(b"data:"):
            continue
        now = time.perf_counter()
        stream.events.append(now)
        chunk = json.loads(line[5:])
        if chunk.get("usage"):
            stream.usage_tokens = chunk["usage"].get("completion_tokens")
        if any(c.get("text") for c in chunk.get("choices") or ()):
            stream.tokens.append(now)
    conn.close()
    stream.end = time.perf_counter()
    return stream
