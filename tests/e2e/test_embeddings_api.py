"""POST /v1/embeddings through the official `openai` client, on one real `ember serve` that
serves a generator (SmolLM2) and an embedder (all-MiniLM-L6-v2) side by side."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from ember.config import EnvSettings
from ember.loading.sources import PACKAGED_MODELS, packaged_path

pytestmark = pytest.mark.e2e

EMBEDDER = "all-minilm-l6-v2"
GENERATOR = "smollm2-135m-instruct"
TEXTS = ["A man is eating food.", "Ünïcödé テキスト 😀", "", "A man is eating a piece of bread."]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for name in (EMBEDDER, GENERATOR):
        model = next(m for m in PACKAGED_MODELS if m.name == name)
        if packaged_path(model, EnvSettings.from_env().cache_path, assemble=False) is None:
            pytest.skip(f"{name} not installed ({model.install_hint})")
    port = _port()
    folder = tmp_path_factory.mktemp("embed-serve")
    log = folder / "serve.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", EMBER_NUM_THREADS="2")
    env.pop("EMBER_API_KEY", None)
    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--port", str(port), "--model", GENERATOR, "--model", EMBEDDER,
           "--log-level", "warning", "--no-access-log", "--batch-dir", str(folder / "batches")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ember serve exited {proc.returncode}:\n{Path(log).read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ember serve not ready:\n{Path(log).read_text()}")
            time.sleep(0.25)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The same texts through LLM.embed (the fp32 path, in this process)."""
    from ember import LLM

    return np.array(LLM(model=EMBEDDER, show_progress=False).embed(TEXTS), dtype=np.float32)


def test_models_lists_both(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list().data} == {GENERATOR, EMBEDDER}
    assert client.models.retrieve(EMBEDDER).id == EMBEDDER


def test_float_and_base64(client: openai.OpenAI, reference: np.ndarray) -> None:
    out = client.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format="float")
    assert [d.index for d in out.data] == list(range(len(TEXTS)))
    floats = np.array([d.embedding for d in out.data], dtype=np.float32)
    np.testing.assert_allclose(floats, reference, atol=1e-6)
    assert out.usage.prompt_tokens == out.usage.total_tokens > 2 * len(TEXTS)
    raw = httpx.post(f"{client.base_url}embeddings", timeout=30, json={
        "model": EMBEDDER, "input": TEXTS, "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                        for d in raw["data"]])
    np.testing.assert_array_equal(decoded, floats)
    # the client's own base64 decoding (its default when numpy is installed)
    viaclient = client.embeddings.create(model=EMBEDDER, input=TEXTS)
    np.testing.assert_array_equal(np.array([d.embedding for d in viaclient.data]), floats)


def test_token_id_inputs(client: openai.OpenAI, url: str, reference: np.ndarray) -> None:
    ids = httpx.post(f"{url}/v1/embeddings", timeout=30, json={"model": EMBEDDER,
                     "input": TEXTS[0]}).json()["usage"]["prompt_tokens"]
    assert ids == 8  # [CLS] a man is eating food . [SEP]
    one = client.embeddings.create(model=EMBEDDER, input=[101, 1037, 2158, 2003, 5983, 2833,
                                                          1012, 102])
    np.testing.assert_allclose(np.array(one.data[0].embedding), reference[0], atol=1e-6)
    many = client.embeddings.create(model=EMBEDDER, input=[[101, 102], [101, 1037, 102]])
    assert len(many.data) == 2


def test_routing_by_model(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=GENERATOR, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError, match="generation model"):
        client.embeddings.create(model=GENERATOR, input="hi")


@pytest.mark.parametrize("body, match", [
    ({"input": "hi", "dimensions": 128}, "native 384"),
    ({"input": "word " * 300}, "maximum of 256"),
    ({"input": []}, "must not be empty"),
    ({"input": [[]]}, "no tokens"),
    ({"input": [5, 99999]}, "outside"),
    ({"input": {"text": "hi"}}, "input"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_requests_are_400(url: str, body: dict, match: str) -> None:
    resp = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert match in resp.json()["error"]["message"] + str(resp.json()["error"]["param"])


def test_truncation_on_request(url: str) -> None:
    resp = httpx.post(f"{url}/v1/embeddings", timeout=30, json={
        "model": EMBEDDER, "input": "word " * 300, "truncate_prompt_tokens": 256})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 256


def test_concurrent_requests_equal_single_requests(client: openai.OpenAI,
                                                   reference: np.ndarray) -> None:
    """Requests in flight together are packed into shared forward steps by the server's
    micro-batcher; each still gets exactly its own vectors, in its own order."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [[TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda texts: client.embeddings.create(
            model=EMBEDDER, input=texts, encoding_format="float"), inputs))
    for i, (texts, out) in enumerate(zip(inputs, outs, strict=True)):
        got = np.array([d.embedding for d in out.data], dtype=np.float32)
        want = reference[[(i + j) % len(TEXTS) for j in range(len(texts))]]
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_embeddings_batch_through_the_server(client: openai.OpenAI,
                                             reference: np.ndarray) -> None:
    """/v1/batches with endpoint /v1/embeddings (the official client's flow): each line is
    answered by the same embeddings serving as the HTTP route; a bad line goes to the error
    file with the route's 400."""
    import io
    import json

    lines = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBEDDER, "input": text}} for i, text in enumerate(TEXTS)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": EMBEDDER, "input": "hi", "dimensions": 3}})
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file = client.files.create(file=("emb.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in (
            "completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.3)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(TEXTS) and batch.request_counts.failed == 1
    assert batch.output_file_id is not None and batch.error_file_id is not None
    out = {x["custom_id"]: x for x in map(json.loads,
                                          client.files.content(batch.output_file_id).text.splitlines())}
    for i in range(len(TEXTS)):
        body = out[f"t{i}"]["response"]["body"]
        np.testing.assert_allclose(np.array(body["data"][0]["embedding"], dtype=np.float32),
                                   reference[i], atol=2e-6)
    [err] = map(json.loads, client.files.content(batch.error_file_id).text.splitlines())
    assert err["custom_id"] == "bad" and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "dimensions"
