"""Edge footprint: what loading an engine must not pull in (issue 15's RSS target).

`benchmarks/edge_rss.py` measures the megabytes; these tests pin the two causes found there:
importing `llguidance.torch` ran a `@torch.compile` decorator (torch._dynamo, inductor, triton:
~180 MB RSS), and llguidance's tokenizer (~30 MB) was built for engines that never see a
constrained request.
"""

from __future__ import annotations

import subprocess
import sys

from ember.sampling.grammar_compiler import GrammarCompiler


def test_engine_imports_leave_out_torch_compile_stack():
    """The offline engine, the async engine and the structured-output modules import without
    torch._dynamo / torch._inductor / triton."""
    code = ("import sys, ember.engine.llm, ember.engine.async_engine, "
            "ember.sampling.constrained, ember.sampling.grammar_compiler\n"
            "heavy = sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton', "
            "'llguidance.torch', 'transformers') if m in sys.modules)\n"
            "print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"heavy modules imported: {proc.stdout.strip()}"


class _Backend:
    def to_str(self) -> str:
        raise AssertionError("llguidance's tokenizer was built before any constrained request")


class _Tokenizer:
    backend = _Backend()
    vocab_size = 100
    eos_token_id = 0


def test_grammar_compiler_builds_llguidance_tokenizer_lazily():
    """Constructing the compiler (done for every engine) does not touch the tokenizer; the
    first grammar does (and fails here, through the stub, which proves the call happens)."""
    compiler = GrammarCompiler(_Tokenizer(), cache_size=4)  # type: ignore[arg-type]
    try:
        assert compiler._ll_tokenizer is None
        try:
            _ = compiler.ll_tokenizer
        except AssertionError as exc:
            assert "constrained request" in str(exc)
        else:
            raise AssertionError("ll_tokenizer did not build the llguidance tokenizer")
    finally:
        compiler.shutdown()
