"""Run the bad-input matrix (:mod:`tests.reliability.cases`): every row must fail with its
error type and a message naming the file or field and what was expected, and leave its
workspace exactly as it was (no file changed or added, no temporary file left)."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from tests.reliability.cases import CASES, Exit, Warns
from tests.reliability.helpers import temp_leftovers, tree_state


pytestmark = pytest.mark.usefixtures("one_thread")


def _outcome(act, expect, capsys):
    """(kind, message) of running ``act``: the exception, exit status or warning it gave."""
    if isinstance(expect, Warns):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            act()
        hits = [w for w in caught if issubclass(w.category, expect.category)]
        assert hits, f"expected a {expect.category.__name__}, got {[str(w.message) for w in caught]}"
        return "warning", "\n".join(str(w.message) for w in hits)
    if isinstance(expect, Exit):
        try:
            code = act()
        except SystemExit as e:          # argparse, or a command's SystemExit(message)
            code = e.code
            if isinstance(code, str):
                print(code, file=__import__("sys").stderr)
                code = 1
        captured = capsys.readouterr()
        assert code == expect.code, f"exit status {code}, expected {expect.code}\n{captured.err}"
        return "exit", captured.err
    with pytest.raises(Exception) as info:
        act()
    assert isinstance(info.value, expect), \
        f"raised {type(info.value).__name__}: {info.value}, expected {expect.__name__}"
    return "error", str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_clear_error_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    act = case.setup(ws, monkeypatch)
    files_before, dirs_before = tree_state(ws)
    capsys.readouterr()
    kind, message = _outcome(act, case.expect, capsys)
    assert re.search(case.match, message, re.S), f"{kind} message does not match {case.match!r}:\n{message}"
    assert "Traceback" not in message
    files_after, dirs_after = tree_state(ws)
    assert not temp_leftovers(ws), f"left behind: {temp_leftovers(ws)}"
    changed = sorted(k for k in files_before if files_after.get(k) != files_before[k])
    added = sorted(set(files_after) - set(files_before)) + sorted(dirs_after - dirs_before)
    assert not changed and not added, f"changed {changed}, added {added}"


def test_the_table_covers_every_entry_point():
    areas = {c.area for c in CASES}
    assert areas == {"data", "train", "synth", "evaluate", "build", "kaggle_cli", "predict", "ensemble",
                     "pseudo_label", "checkpoint", "submission", "kernel"}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_kernel_parameter_types_cover_every_parameter_and_accept_the_defaults():
    from fwi_core.params import KERNEL_PARAMETERS, check_parameters
    from tests.reliability.cases import kernel_parameters

    for kernel in ("train", "infer"):
        params = kernel_parameters(kernel)
        assert set(params) == set(KERNEL_PARAMETERS[kernel]), kernel
        check_parameters(kernel, params)


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_machine_without_cuda(tmp_path, monkeypatch):
    import zipfile

    from fwi_core.train import load_model
    from tests.reliability.cases import cuda_tagged_checkpoint

    ck = cuda_tagged_checkpoint(tmp_path / "best.pt")
    with zipfile.ZipFile(ck) as z:
        pickle = [z.read(n) for n in z.namelist() if n.endswith("data.pkl")][0]
    assert b"cuda:0" in pickle and b"X\x03\x00\x00\x00cpu" not in pickle
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):          # what a plain torch.load does
        torch.load(ck, weights_only=True)
    model = load_model(ck)
    assert next(model.parameters()).device.type == "cpu"
