"""What a killed writer leaves behind is cleaned up by the next run, and a live writer's
temporary file or staging folder is never touched (``fwi_core.utils``)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from fwi_core.utils import atomic_path, atomic_write_text, locked_staging_dir, remove_stale_temps
from tests.reliability.killer import ROOT, subprocess_env

WRITER = textwrap.dedent("""
    import sys, time
    from fwi_core.utils import atomic_path, locked_staging_dir
    with locked_staging_dir(sys.argv[1] + "/data") as stage, atomic_path(sys.argv[1] + "/submission.csv") as tmp:
        (stage / "half.npy").write_bytes(b"x" * 1000)
        with open(tmp, "w") as f:
            f.write("oid_ypos,x_1\\n")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
""")


def test_a_live_writer_keeps_its_files_and_a_killed_one_leaves_them_for_the_next_run(tmp_path):
    atomic_write_text(tmp_path / "submission.csv", "the previous submission\n")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert len(temps) == 2 and temps[0].endswith(".staging") and temps[1].startswith(".submission.csv.")
        assert remove_stale_temps(tmp_path) == []                  # alive: nothing removed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "submission.csv").read_text() == "the previous submission\n"
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == temps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_only_the_named_files_temporaries_are_removed(tmp_path):
    for name in (".a.csv.x1.csv.tmp", ".b.json.x2.json.tmp", ".a.csv.state", "notes.tmp"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_stale_temps(tmp_path, "a.csv")] == [".a.csv.x1.csv.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.csv.state", ".b.json.x2.json.tmp", "notes.tmp"]


def test_in_process_writers_are_alive(tmp_path):
    with atomic_path(tmp_path / "ckpt.pt") as tmp, locked_staging_dir(tmp_path / "ds") as stage:
        tmp.write_bytes(b"partial")
        time.sleep(0.01)
        assert remove_stale_temps(tmp_path) == [] and tmp.exists() and stage.is_dir()
        stage.rename(tmp_path / "ds")
    assert (tmp_path / "ckpt.pt").read_bytes() == b"partial" and (tmp_path / "ds").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ds"]
