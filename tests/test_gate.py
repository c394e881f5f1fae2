"""``train.gate``: two processes taking epochs in turn, as `lst bench train` runs a cached run and its floor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.bench.train import in_turns

CHILD = textwrap.dedent("""
    import sys, time
    from pipeline.train.gate import epoch_gate
    name, gate, log, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with epoch_gate(gate) as g:
        for e in range(epochs):
            g(e)
            with open(log, "a") as f:
                f.write(f"{name}{e} start\\n")
            time.sleep(0.05)
            with open(log, "a") as f:
                f.write(f"{name}{e} end\\n")
    print('{"done": "%s"}' % name)
""")


def _start(name: str, gate: Path, log: Path, epochs: int):
    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, name, str(gate), str(log), str(epochs)],
                             capture_output=True, text=True, check=True)
        return {"out": out.stdout.strip()}
    return run


def test_two_gated_processes_take_their_epochs_in_turn(tmp_path):
    log = tmp_path / "log"
    for b_first in (False, True):
        log.write_text("")
        a, b = in_turns(_start("a", tmp_path / "ga", log, 3), tmp_path / "ga",
                        _start("b", tmp_path / "gb", log, 3), tmp_path / "gb", 3, b_first=b_first)
        assert a == {"out": '{"done": "a"}'} and b == {"out": '{"done": "b"}'}
        order = "ba" if b_first else "ab"
        want = [f"{n}{e} {w}" for e in range(3) for n in order for w in ("start", "end")]
        assert log.read_text().splitlines() == want  # never both inside an epoch at once


def test_a_process_whose_keeper_is_gone_runs_on(tmp_path):
    """Where the keeper closed its pipes (the bench ended early), the gated process waits for no turn."""
    from pipeline.train.gate import TurnKeeper

    keep = TurnKeeper(tmp_path / "g")
    log = tmp_path / "log"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "a", str(tmp_path / "g"), str(log), "3"],
                            stdout=subprocess.PIPE, text=True)
    assert keep.wait(lambda: proc.poll() is None)  # at its first gate
    keep.close()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "done" in out
    assert len(log.read_text().splitlines()) == 6


def test_a_process_that_exits_early_ends_its_turns(tmp_path):
    """A gated process with fewer epochs than turns (or one that fails) does not hang the keeper."""
    log = tmp_path / "log"
    log.write_text("")
    a, b = in_turns(_start("a", tmp_path / "ga", log, 1), tmp_path / "ga",
                    _start("b", tmp_path / "gb", log, 3), tmp_path / "gb", 3)
    assert "done" in a["out"] and "done" in b["out"]
    assert log.read_text().splitlines()[:4] == ["a0 start", "a0 end", "b0 start", "b0 end"]


def test_no_gate_path_gives_no_gate():
    from pipeline.train.gate import epoch_gate

    with epoch_gate(None) as g:
        assert g is None
