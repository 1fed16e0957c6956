"""Ingestion with img2dataset from a real HTTP server on 127.0.0.1 (COCO photos, broken and
missing URLs, real LAION captions), and from a folder of images with sidecar captions."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

from curate.io.shards import iter_samples
from tests.conftest import shared_data

BIN = Path(sys.executable).parent


@pytest.fixture
def http_root(tmp_path: Path):
    coco = shared_data("images/coco_val2017_mini")
    root = tmp_path / "www"
    root.mkdir()
    photos = sorted(coco.glob("*.jpg"))[:24]
    for p in photos:
        shutil.copy(p, root / p.name)
    (root / "broken.jpg").write_bytes(b"this is not an image at all")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", photos
    srv.shutdown()


@pytest.mark.slow
def test_ingest_urls_with_img2dataset(http_root, tmp_path: Path):
    base, photos = http_root
    caps = pl.read_csv(shared_data("images/coco_val2017_mini_captions.tsv"), separator="\t", quote_char=None)
    cap_of = dict(zip(caps["file_name"], caps["caption"]))
    laion = pl.read_parquet(shared_data("captions/laion400m_sample_10000.parquet"))["TEXT"].to_list()
    rows = [{"url": f"{base}/{p.name}", "caption": cap_of.get(p.name, laion[i])} for i, p in enumerate(photos)]
    rows.append({"url": f"{base}/broken.jpg", "caption": laion[100]})
    rows += [{"url": f"{base}/missing-{i}.jpg", "caption": laion[200 + i]} for i in range(3)]
    urls = tmp_path / "urls.parquet"
    pl.DataFrame(rows).write_parquet(urls)
    out = tmp_path / "shards"
    r = subprocess.run([str(BIN / "curate"), "ingest", str(urls), "--out", str(out), "--processes", "1",
                        "--threads", "8", "--timeout", "5"], capture_output=True, text=True, timeout=300,
                       env={"PATH": str(BIN), "HOME": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1",
                            "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = {}
    for shard in sorted(out.glob("*.tar")):
        for s in iter_samples(shard):
            meta = s.meta()
            got[meta["url"]] = (s.image(), (s.caption_bytes() or b"").decode(), meta)
    served = {f"{base}/{p.name}": p.read_bytes() for p in photos}
    assert set(got) == set(served)
    for url, (img, cap, meta) in got.items():
        assert hashlib.sha256(img).hexdigest() == hashlib.sha256(served[url]).hexdigest()  # no re-encode
        assert meta["original_width"] and meta["original_height"]
        assert cap == next(x["caption"] for x in rows if x["url"] == url)
    status = pl.read_parquet(str(out / "*.parquet"))
    failed = status.filter(pl.col("status") != "success")
    assert failed.height == 4 and failed["error_message"].null_count() == 0
    print(failed.select("url", "status", "error_message"))


@pytest.mark.slow
def test_an_ingest_that_downloads_nothing_is_one_line_and_exit_2(http_root, tmp_path: Path):
    base, _ = http_root
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{base}/missing-{i}.jpg,a photo of a dog\n" for i in range(6)))
    r = subprocess.run([str(BIN / "curate"), "ingest", str(urls), "--out", str(tmp_path / "shards"), "--processes",
                        "1", "--threads", "4", "--timeout", "5"], capture_output=True, text=True, timeout=300,
                       env={"PATH": str(BIN), "HOME": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1",
                            "WANDB_MODE": "disabled"})
    assert r.returncode == 2, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "downloaded no image: 6 URL(s) read, 6 failed" in err[0] and "404" in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_ingest_folder_with_sidecar_captions(tmp_path: Path):
    coco = shared_data("images/coco_val2017_mini")
    src = tmp_path / "folder"
    src.mkdir()
    for i, p in enumerate(sorted(coco.glob("*.jpg"))[:5]):
        shutil.copy(p, src / p.name)
        if i < 4:
            (src / p.name).with_suffix(".txt").write_text(f"caption number {i}")
    r = subprocess.run([str(BIN / "curate"), "ingest", str(src), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    samples = [s for t in sorted((tmp_path / "out").glob("*.tar")) for s in iter_samples(t)]
    assert len(samples) == 5
    assert sum(1 for s in samples if s.caption_bytes()) == 4


@pytest.fixture
def synthetic_site(tmp_path: Path):
    """An HTTP server on 127.0.0.1 serving 30 generated JPEGs (no ../shared needed)."""
    from tests.conftest import jpeg_bytes

    root = tmp_path / "site"
    root.mkdir()
    for i in range(30):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((220 + i, 210), (8 * i, 100, 200 - 4 * i)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.slow
def test_ingest_from_a_metadata_run_downloads_only_its_survivors(synthetic_site: str, tmp_path: Path):
    """Filter before download: a text filter on a metadata pool, then img2dataset fetches only the
    kept samples, with their uids, and an image run over the shards sees exactly those uids."""
    from curate.report.decisions import decisions
    from curate.runner.pipeline import run_pipeline
    from tests.conftest import make_config, make_pipeline

    texts = [f"a photo of a red car number {i} on the street" if i % 3 else "xx" for i in range(30)]
    meta = tmp_path / "meta"
    meta.mkdir()
    pl.DataFrame({"uid": [f"{i:032x}" for i in range(30)], "url": [f"{synthetic_site}/{i}.jpg" for i in range(30)],
                  "text": texts}).write_parquet(meta / "00000.parquet")
    work = tmp_path / "work"
    assert run_pipeline(make_pipeline(("text", {"min_words": 3})), make_config(str(meta / "*.parquet"), work)).ok
    kept = set(decisions(work).filter(pl.col("kept"))["uid"])
    assert len(kept) == 20
    out = tmp_path / "shards"
    env = {"PATH": str(BIN), "HOME": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([str(BIN / "curate"), "ingest", "--from", str(work), "--out", str(out), "--processes", "1",
                        "--threads", "4", "--timeout", "5"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "10 of 30 dropped before download" in r.stdout
    report = json.loads((work / "ingest.json").read_text())
    assert report["kept_by_metadata_run"] == 20 and report["bytes_not_downloaded_estimate"] > 0
    from curate.report.html import write_report

    assert "10 of 30 samples dropped on metadata" in write_report(work).read_text()
    images = tmp_path / "images"
    assert run_pipeline(make_pipeline(("image", {"min_side": 200})), make_config(str(out / "*.tar"), images)).ok
    assert set(pl.read_parquet(images / "index" / "*.parquet")["uid"]) == kept

    bad = subprocess.run([str(BIN / "curate"), "ingest", "--from", str(tmp_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "not a work dir" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_ingest_from_a_metadata_run_whose_work_dir_is_on_s3(synthetic_site: str, s3, tmp_path: Path):
    """The same filter-before-download with the metadata run's work dir on S3 (`--config` gives
    the endpoint): the survivors are downloaded and ingest.json lands in the bucket."""
    import s3fs
    import yaml

    from curate.runner.pipeline import run_pipeline
    from tests.conftest import BUCKET, make_config, make_pipeline

    endpoint, _ = s3
    meta = tmp_path / "meta"
    meta.mkdir()
    texts = [f"a photo of a red car number {i} on the street" if i % 3 else "xx" for i in range(30)]
    pl.DataFrame({"uid": [f"{i:032x}" for i in range(30)], "url": [f"{synthetic_site}/{i}.jpg" for i in range(30)],
                  "text": texts}).write_parquet(meta / "00000.parquet")
    work = f"s3://{BUCKET}/ingest/work"
    options = {"s3": {"endpoint_url": endpoint}}
    cfg = make_config(str(meta / "*.parquet"), work).model_copy(update={"storage_options": options})
    assert run_pipeline(make_pipeline(("text", {"min_words": 3})), cfg).ok
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump({"storage_options": options}))
    out = tmp_path / "shards"
    env = {"PATH": str(BIN), "HOME": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    r = subprocess.run([str(BIN / "curate"), "ingest", "--from", work, "--config", str(tmp_path / "s3.yaml"),
                        "--out", str(out), "--processes", "1", "--threads", "4", "--timeout", "5"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "10 of 30 dropped before download" in r.stdout
    report = json.loads(s3fs.S3FileSystem(endpoint_url=endpoint).cat(f"{BUCKET}/ingest/work/ingest.json"))
    assert report["kept_by_metadata_run"] == 20
