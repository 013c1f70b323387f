"""Batch line parsing and the crash-safe results journal (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.batch.format import (DUPLICATE_CODE, BatchLine, LineError, error_line, parse_line,
                                response_line)
from ember.batch.journal import JournalBusyError, ResultJournal
from ember.batch.runner import _Skipper, count_lines

SERVED = frozenset({"/v1/chat/completions", "/v1/completions"})


def line(custom_id: object = "a", url: str = "/v1/completions", **extra: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"prompt": "x"}, **extra})


@pytest.mark.parametrize("raw, code", [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_line"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "missing_custom_id"),
    (line(custom_id=""), "missing_custom_id"),
    (line(custom_id=7), "missing_custom_id"),
    (line(method="GET"), "invalid_method"),
    (line(url="/v1/nope"), "invalid_url"),
    (line(url="/v1/embeddings"), "unsupported_url"),
    (line(body=[1]), "invalid_body"),
])
def test_bad_lines_become_errors_naming_the_line(raw: str, code: str) -> None:
    out = parse_line(3, raw, SERVED)
    assert isinstance(out, LineError)
    assert out.code == code and out.message.startswith("line 3: ")
    written = error_line(out)
    assert written["response"] is None and written["error"]["code"] == code


def test_good_line_and_endpoint_check() -> None:
    out = parse_line(1, line(), SERVED)
    assert out == BatchLine(1, "a", "/v1/completions", {"prompt": "x"})
    mismatch = parse_line(1, line(), SERVED, endpoint="/v1/chat/completions")
    assert isinstance(mismatch, LineError) and mismatch.code == "mismatched_url"


def test_journal_cuts_a_torn_tail_and_knows_what_is_done(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    ok = response_line("a", 200, "r1", {"x": 1})
    bad = response_line("b", 400, "r2", {"error": {}})
    noid = error_line(LineError(5, None, "invalid_json", "line 5: bad"))
    dup = error_line(LineError(6, "a", DUPLICATE_CODE, "line 6: dup"))
    whole = "".join(json.dumps(x) + "\n" for x in (ok, bad, noid, dup))
    path.write_text(whole + '{"id": "batch_req_x", "custom_id": "c", "resp')  # torn
    with ResultJournal.open(path) as journal:
        assert journal.done_ids == {"a", "b"}
        assert journal.duplicate_counts["a"] == 1 and journal.num_without_id == 1
        assert (journal.num_ok, journal.num_failed) == (1, 3)
        assert journal.num_truncated_bytes > 0
        assert path.read_text() == whole
        journal.append([response_line("c", 200, "r3", {})])
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["custom_id"] == "c"


def test_journal_background_sync_fsyncs_off_the_writer_thread(tmp_path: Path,
                                                              monkeypatch) -> None:
    import os
    import threading
    import time

    import ember.batch.journal as journal_mod

    synced: list[tuple[int, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((fd, threading.current_thread().name))
        real_fsync(fd)

    monkeypatch.setattr(journal_mod.os, "fsync", fsync)
    path = tmp_path / "out.jsonl"
    journal = ResultJournal.open(path, fsync_interval_s=0.01, background_sync=True)
    journal.append([response_line("a", 200, "r1", {})])  # written at once, fsync'd later
    assert json.loads(path.read_text())["custom_id"] == "a"
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced and all(name == "ember-journal-fsync" for _, name in synced)
    journal.append([response_line("b", 200, "r2", {})])
    journal.close()  # stops the thread, then a last fsync of what is left
    assert not any(t.name == "ember-journal-fsync" for t in threading.enumerate())
    assert [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] == ["a", "b"]
    with ResultJournal.open(path) as again:
        assert again.done_ids == {"a", "b"}


def test_journal_refuses_a_second_writer(tmp_path: Path) -> None:
    with ResultJournal.open(tmp_path / "out.jsonl"):
        with pytest.raises(JournalBusyError, match="another run"):
            ResultJournal.open(tmp_path / "out.jsonl")


def test_skipper_resumes_duplicates_and_idless_lines_by_count(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    # A first run wrote: the duplicate of "a" (not "a" itself) and one id-less error.
    path.write_text(json.dumps(error_line(LineError(2, "a", DUPLICATE_CODE, "dup"))) + "\n"
                    + json.dumps(error_line(LineError(3, None, "invalid_json", "x"))) + "\n")
    inputs = [line("a"), line("a"), "bad", "bad", line("a"), line("b")]
    with ResultJournal.open(path) as journal:
        skipper = _Skipper(journal)
        decisions = [skipper.classify(parse_line(i, raw, SERVED))
                     for i, raw in enumerate(inputs, 1)]
    done = [d for d, _ in decisions]
    # "a" runs; its 1st duplicate is done, the 2nd is not; 1st id-less done, 2nd not.
    assert done == [False, True, True, False, False, False]
    assert isinstance(decisions[4][1], LineError) and decisions[4][1].code == DUPLICATE_CODE


def test_count_lines(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x\ny\nz")
    (tmp_path / "b").write_bytes(b"x\ny\n")
    (tmp_path / "c").write_bytes(b"")
    assert [count_lines(tmp_path / n) for n in "abc"] == [3, 2, 0]
