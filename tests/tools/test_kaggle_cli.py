"""The real kaggle CLI against a loopback stub of the Kaggle API (KAGGLE_API_ENVIRONMENT=LOCALHOST
sends every call to http://localhost:80/api/v1/...)."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest

from tests.tools.test_build import make_root
from tools import kaggle_cli

ROOT = Path(__file__).resolve().parents[2]


class _Stub(BaseHTTPRequestHandler):
    calls = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Stub.calls.append((self.path, json.loads(body or b"{}")))
        if self.path.endswith("GetKernelSessionStatus"):
            out = {"status": "COMPLETE", "failureMessage": ""}
        else:
            out = {"ref": "/code/someone/demo-kernel", "url": "http://localhost/code/someone/demo-kernel",
                   "versionNumber": 3, "error": ""}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def kaggle_stub():
    try:
        server = ThreadingHTTPServer(("127.0.0.1", 80), _Stub)
    except (PermissionError, OSError) as e:
        pytest.fail(f"cannot bind the loopback Kaggle stub on port 80 (the CLI's LOCALHOST endpoint): {e}")
    _Stub.calls = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield _Stub.calls
    server.shutdown()
    server.server_close()


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE")}
    env.update(HOME=str(tmp_path / "home"), KAGGLE_API_ENVIRONMENT="LOCALHOST", **extra)
    return env


def _cli(args, env):
    code = "import sys; from tools.kaggle_cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_push_sends_the_built_notebook_and_metadata(tmp_path, kaggle_stub, monkeypatch):
    root = make_root(tmp_path)
    monkeypatch.setattr(kaggle_cli, "ROOT", root)
    for k, v in _env(tmp_path, KAGGLE_USERNAME="someone", KAGGLE_KEY="secret").items():
        monkeypatch.setenv(k, v)
    build_dir = tmp_path / "build"
    assert kaggle_cli.push("demo", build_dir, root=root) == 0
    (path, body), = [c for c in kaggle_stub if c[0].endswith("SaveKernel")]
    assert path == "/api/v1/kernels.KernelsApiService/SaveKernel"
    built = nbformat.read(build_dir / "demo" / "demo.ipynb", as_version=4)
    sent = nbformat.reads(body["text"], as_version=4)  # the CLI re-serialises the JSON
    assert [(c.id, c.cell_type, c.source) for c in sent.cells] == [(c.id, c.cell_type, c.source) for c in built.cells]
    assert sent.metadata == built.metadata and sent.metadata.kernelspec.name == "python3"
    assert body["slug"] == "someone/demo-kernel" and body["newTitle"] == "Demo Kernel"
    assert body["kernelType"] == "notebook" and body["language"] == "python"
    assert body["competitionDataSources"] == ["waveform-inversion"]
    assert body["enableInternet"] is False


def test_real_infer_kernel_push_via_make_target_entry(tmp_path, kaggle_stub):
    r = _cli(["push", "infer"], _env(tmp_path, KAGGLE_USERNAME="someone", KAGGLE_KEY="secret"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "successfully pushed" in r.stdout
    (_, body), = [c for c in kaggle_stub if c[0].endswith("SaveKernel")]
    meta = json.loads((ROOT / "build/infer/kernel-metadata.json").read_text())
    # the template user name in kernel-metadata/ is replaced by KAGGLE_USERNAME
    assert meta["id"] == "someone/fwi-toolkit-infer" and meta["kernel_sources"] == ["someone/fwi-toolkit-train"]
    assert body["slug"] == meta["id"] and body["newTitle"] == meta["title"]
    assert body["enableInternet"] is False and body["competitionDataSources"] == ["waveform-inversion"]
    sent = nbformat.reads(body["text"], as_version=4)
    assert sent.metadata.fwi_toolkit.kernel == "infer"
    assert [c.source for c in sent.cells] == [c.source for c in nbformat.read(ROOT / "build/infer/infer.ipynb", 4).cells]


def test_status_goes_through_the_cli(tmp_path, kaggle_stub):
    root = make_root(tmp_path)
    from tools.build import build
    build(["demo"], ROOT / "build", root)
    try:
        r = _cli(["status", "demo"], _env(tmp_path, KAGGLE_USERNAME="someone", KAGGLE_KEY="secret"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "someone/demo-kernel" in r.stdout and "COMPLETE" in r.stdout
        assert any(p.endswith("GetKernelSessionStatus") for p, _ in kaggle_stub)
    finally:
        import shutil
        shutil.rmtree(ROOT / "build" / "demo", ignore_errors=True)


def test_missing_credentials_is_one_clear_line(tmp_path):
    r = _cli(["push", "infer"], _env(tmp_path))
    assert r.returncode == 2
    assert "no Kaggle credentials" in r.stderr and "Traceback" not in r.stderr


def test_credentials_sources(tmp_path):
    env = {"HOME": str(tmp_path)}
    assert kaggle_cli.credentials_source(env) is None
    assert kaggle_cli.credentials_source({**env, "KAGGLE_API_TOKEN": "x"}) == "KAGGLE_API_TOKEN"
    assert kaggle_cli.credentials_source({**env, "KAGGLE_USERNAME": "u"}) is None
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "kaggle.json").write_text("{}")
    assert kaggle_cli.credentials_source({**env, "KAGGLE_CONFIG_DIR": str(tmp_path / "cfg")}).endswith("kaggle.json")


def test_template_user_without_username_is_a_clear_error(tmp_path):
    meta = tmp_path / "kernel-metadata.json"
    meta.write_text(json.dumps({"id": "your-kaggle-username/x-kernel", "kernel_sources": []}))
    with pytest.raises(kaggle_cli.KaggleCLIError, match="write your Kaggle user name"):
        kaggle_cli.personalise(meta, env={})
    assert kaggle_cli.personalise(meta, env={"KAGGLE_USERNAME": "me"}) == "me/x-kernel"
    assert kaggle_cli.personalise(meta, env={}) == "me/x-kernel"  # already personal
