"""The console of `compactlm run`: stage lines, progress at quarters off a terminal, warnings once."""

from __future__ import annotations

import io
import logging
import os

from compactlm import progress
from flows.console import Console


def test_stage_lines_progress_and_warnings(tmp_path):
    out = io.StringIO()
    with Console(tmp_path, out=out) as console:
        progress.announce("distill", "start", output="runs/distill/abc", cached=False)
        for step in range(1, 9):
            progress.report("distill", step, 8, loss=2.0 / step, tok_s=400.0)
        progress.announce("distill", "end", ok=True, seconds=12.5, cached=False, summary={"loss": 0.25})
        progress.announce("score", "start", output="runs/score/x", cached=True)
        progress.announce("score", "end", ok=True, seconds=0.1, cached=True, output="runs/score/x")
        progress.announce("prune", "start", output="runs/prune/y", cached=False)
        progress.announce("prune", "end", ok=False, seconds=1.0, cached=False, log="runs/logs/r/prune.log",
                          error="ValueError: prune.num_hidden_layers is too large")
        for _ in range(2):
            logging.getLogger("compactlm.stage").warning("the student is larger than the teacher")
        logging.getLogger("lm_eval.models").warning("engine chatter")
        os.write(1, b"an engine's line\n")  # fd level, like a C library or a child process
    lines = out.getvalue().splitlines()
    assert lines[0] == "distill   started   -> runs/distill/abc"
    assert [ln.split()[1] for ln in lines[1:4]] == ["25", "50", "75"] and "2/8 steps" in lines[1]
    assert lines[4] == "distill   done      in 12.5 s (loss 0.250)"
    assert lines[5] == "score     cached    runs/score/x"
    assert lines[7].startswith("prune     FAILED    after 1.0 s: ValueError") and lines[8].endswith("prune.log")
    assert lines[9:] == ["warning: the student is larger than the teacher"]
    assert "an engine's line" in console.log.read_text()
    progress.report("distill", 1, 8)  # the console stopped listening
    assert out.getvalue().splitlines() == lines


def test_a_labelled_stage_shows_its_engines_progress(tmp_path):
    """A chain's distill-2 (and the teacher correction) run the distill trainer, which reports as distill."""
    out = io.StringIO()
    with Console(tmp_path, out=out):
        progress.report("distill", 1, 4)  # no stage running: nothing to draw on
        progress.announce("distill-2", "start", output="runs/distill/def", cached=False)
        for step in range(1, 5):
            progress.report("distill", step, 4, loss=1.0)
        progress.announce("distill-2", "end", ok=True, seconds=3.0, cached=False, summary={"loss": 1.0})
    lines = out.getvalue().splitlines()
    assert lines[0] == "distill-2 started   -> runs/distill/def"
    assert lines[1].startswith("distill-2  25 %     1/4 steps") and len(lines) == 5, lines
    assert lines[4] == "distill-2 done      in 3.0 s (loss 1.000)"
