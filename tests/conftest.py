from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import time
from pathlib import Path

import pytest
from PIL import ImageFile

from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.io.storage import set_storage_options
from curate.tools.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared_data(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"real data {p} not present (../shared/data missing)")
    return p


BUCKET = "curate-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """(endpoint, local pool folder): a moto S3 server holding the pool under s3://curate-test/pool/."""
    from moto.server import ThreadedMotoServer
    import s3fs

    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    pool = tmp_path_factory.mktemp("s3pool")
    synthesize(pool, samples=240, shards=3, seed=5)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    for p in sorted(pool.glob("*.tar")):
        fs.put(str(p), f"{BUCKET}/pool/{p.name}")
    fs.pipe(f"{BUCKET}/lists/two.txt", b"# two shards\n../pool/00000.tar\ns3://curate-test/pool/00002.tar\n")
    yield endpoint, pool
    server.stop()
    set_storage_options({})
    mp.undo()


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> Path:
    """A small synthetic pool with every defect: 400 samples in 4 shards."""
    out = tmp_path_factory.mktemp("pool")
    synthesize(out, samples=400, shards=4, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Random tiny CLIP weights (seed 0) saved once, so every run that loads them scores alike."""
    import torch

    from curate.models.clip import load_clip

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": load_clip("curate-tiny", None).model.state_dict()}, p)
    return p


def make_pipeline(*stages: tuple[str, dict] | str, name: str = "test") -> PipelineConfig:
    specs = [StageSpec(name=s) if isinstance(s, str) else StageSpec(name=s[0], params=s[1]) for s in stages]
    return PipelineConfig(name=name, stages=specs)


def make_config(input: str | list[str], workdir: Path, kind: str = "inprocess", device: str = "cpu",
                **executor) -> RunConfig:
    ex = {"kind": kind, "n_workers": 2, "retries": 0, "dashboard": False} | executor
    return RunConfig.model_validate({"input": input, "workdir": str(workdir), "executor": ex, "device": device})


def write_tar(path: Path, members: list[tuple[str, bytes]], kinds: dict[str, bytes] | None = None) -> Path:
    """A tar with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def tables_equal_dir(a: Path, b: Path, sub: str) -> None:
    import pyarrow.parquet as pq

    fa = sorted(p.name for p in (a / sub).glob("*.parquet"))
    fb = sorted(p.name for p in (b / sub).glob("*.parquet"))
    assert fa == fb and fa, (fa, fb)
    for name in fa:
        ta = pq.read_table(a / sub / name)
        tb = pq.read_table(b / sub / name)
        assert ta.equals(tb), f"{sub}/{name} differs"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Any accidental hub download must fail fast rather than hang.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield


@pytest.fixture(autouse=True)
def _logging_enabled():
    # an interrupted CLI run silences logging process-wide (its exit noise follows an answer
    # already given); the next test's log capture must not inherit that
    logging.disable(logging.NOTSET)
    yield


os.environ.setdefault("OMP_NUM_THREADS", "1")


HANG_MAGIC = b"HANGIMG\n"  # first bytes of an image whose decoder never returns (see hanging_format)


class _HangingImage(ImageFile.ImageFile):
    """A PIL format whose header parses and whose decoder never returns: a stand-in for a crafted
    file that sends a real decoder into a loop."""

    format = "HANGTEST"
    format_description = "test format that hangs on decode"

    def _open(self) -> None:
        if self.fp.read(8) != HANG_MAGIC:
            raise SyntaxError("not a hanging test image")
        self._size = (640, 480)
        self._mode = "RGB"
        self.tile = []

    def load(self):
        time.sleep(3600)
        return super().load()


@pytest.fixture
def hanging_format():
    from PIL import Image

    Image.register_open(_HangingImage.format, _HangingImage, lambda prefix: prefix[:8] == HANG_MAGIC)
    yield
    Image.OPEN.pop(_HangingImage.format, None)
    Image.ID.remove(_HangingImage.format)


def pytest_collection_modifyitems(config, items):
    """The test that trains the demo scorer (minutes) first: under pytest-xdist (`make test` runs
    two workers) one worker starts it at once while the other works through the rest."""
    items.sort(key=lambda it: 0 if it.nodeid.startswith("tests/test_demo.py::test_small_demo") else 1)
