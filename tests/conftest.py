"""Shared fixtures. Model fixtures load once per test session (loads take seconds)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.loading.sources import PACKAGED_MODELS, packaged_path


def _shared_data() -> Path:
    """`shared/data` beside the checkout, or, in a git worktree (its .git a file naming
    <main>/.git/worktrees/<name>), beside the main checkout."""
    root = Path(__file__).resolve().parents[1]
    candidates = [root.parent / "shared" / "data"]
    git = root / ".git"
    if git.is_file() and git.read_text().startswith("gitdir:"):
        gitdir = Path(git.read_text().split(":", 1)[1].strip())
        if len(gitdir.parents) > 2:
            candidates.append(gitdir.parents[2].parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), candidates[0])


SHARED_DATA = _shared_data()


def smollm2_gguf() -> Path:
    path = packaged_path(PACKAGED_MODELS[0])
    if path is None:
        pytest.fail(f"default model missing: {PACKAGED_MODELS[0].install_hint} (make setup does it)")
    return path


@pytest.fixture(scope="session")
def load_kernels() -> Callable[[str | None], object]:
    """CPU kernels from the default kernel cache (built once per source hash), one library per
    ISA per session: load_kernels(None) the best ISA this CPU runs, load_kernels("portable")
    a forced one. Fails (never skips) when a build fails."""
    from ember.kernels.ops import CpuKernels

    libs: dict[str | None, CpuKernels] = {}

    def load(isa: str | None = None) -> CpuKernels:
        if isa not in libs:
            k = CpuKernels.load(None, num_threads=2, force_isa=isa)
            assert k is not None and (isa is None or k.isa == isa), \
                f"the {isa or 'best'} kernels failed to compile"
            libs[isa] = k
        return libs[isa]

    return load


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (the novels), failing the test where it is missing."""
    if not (SHARED_DATA / "pride_and_prejudice.txt").is_file():
        pytest.fail(f"shared data missing: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pride_text() -> str:
    path = SHARED_DATA / "pride_and_prejudice.txt"
    if not path.is_file():
        pytest.fail(f"evaluation text missing: {path}")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def make_llm() -> Callable[..., object]:
    """Factory of LLM engines, cached per keyword arguments for the session."""
    from ember import LLM

    cache: dict[tuple, object] = {}

    def make(**kwargs: object) -> object:
        # NOTE: LLM's default runs the file's own format; these tests compare against the
        # dense fp32 reference unless they ask for a format.
        kwargs.setdefault("quantization", None)
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = LLM(show_progress=False, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llm(make_llm):
    """The dense fp32 reference engine."""
    return make_llm(quantization=None)


_GGUF_READER: dict[str, object] = {}
"""The last file `gguf_parsed_once` parsed (one at a time: a parsed header is large)."""


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    import gguf
    import numpy as np

    real = gguf.GGUFReader

    class PlainArrayReader(real):  # type: ignore[misc,valid-type]
        """GGUFReader slices its np.memmap once per array element (Gemma: 262k strings);
        a plain ndarray view of the same mapping slices ~2.5x faster (the same bytes)."""

        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

    def reader(path: object, mode: str = "r") -> object:
        if mode != "r":  # only read-only readers are shared
            return real(path, mode)  # type: ignore[arg-type]
        key = str(Path(str(path)).resolve())
        if key not in _GGUF_READER:
            _GGUF_READER.clear()
            _GGUF_READER[key] = PlainArrayReader(path)
        return _GGUF_READER[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = real  # type: ignore[misc]


@pytest.fixture(scope="session")
def gguf_parsed_once() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """`with gguf_parsed_once(): <transformers loads from a GGUF>`: transformers' config,
    weight and tokenizer loaders each build a `gguf.GGUFReader` of the whole file (Gemma 3's
    262k-token vocabulary: ~25 s a parse on 2 cores); inside this, the same file's read-only
    reader is parsed once and shared. transformers still reads every value and tensor
    itself, so it stays an independent reference."""
    return _gguf_parsed_once


@pytest.fixture(scope="session")
def fp32_perplexity(llm, pride_text):
    """The dense fp32 engine's perplexity on the DESIGN protocol (8192 tokens, 512-token
    windows), computed once: the transformers parity test and the weight-format tests
    both compare against it."""
    from ember.eval.perplexity import perplexity

    return perplexity(llm, pride_text)


@pytest.fixture(scope="session")
def hf_model(gguf_path, gguf_parsed_once):
    """HF transformers reference on the same GGUF weights, fp32 (slow: ~20 s, once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent),
                                                     gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path, gguf_parsed_once):
    from transformers import AutoTokenizer

    with gguf_parsed_once():
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
