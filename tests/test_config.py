from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curate.core.config import ConfigError, load_run_config
from curate.runner.registry import load_pipeline
from curate.runner.pipeline import run_pipeline
from tests.conftest import ROOT, make_config, make_pipeline


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_every_shipped_pipeline_and_config_validates():
    for p in sorted((ROOT / "pipelines").glob("*.yaml")):
        load_pipeline(p)
    for c in sorted((ROOT / "configs").glob("*.yaml")):
        load_run_config(c)


def test_unknown_key_names_file_and_key(tmp_path: Path):
    p = _write(tmp_path / "c.yaml", "workdir: w\nexecutor:\n  n_workerz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert str(p) in str(e.value) and "executor.n_workerz" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_and_enum(tmp_path: Path):
    p = _write(tmp_path / "c.yaml", "executor:\n  n_workers: many\ndevice: tpu\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "executor.n_workers" in msg and "device" in msg and "'cuda'" in msg


def test_malformed_yaml_and_missing_file(tmp_path: Path):
    p = _write(tmp_path / "bad.yaml", "stages: [\n  - name: index\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_pipeline(p)
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_unknown_stage_and_stage_param(tmp_path: Path):
    p = _write(tmp_path / "p.yaml", "stages:\n  - name: nosuch\n")
    with pytest.raises(ConfigError, match="unknown stage 'nosuch'.*allowed: .*index"):
        load_pipeline(p)
    p = _write(tmp_path / "p2.yaml", "stages:\n  - name: index\n    params: {foo: 1}\n")
    with pytest.raises(ConfigError, match=r"(?s)stages\[0\] \(index\).*params.foo: unknown key"):
        load_pipeline(p)


def test_cli_rejects_bad_config_without_traceback(tmp_path: Path):
    p = _write(tmp_path / "p.yaml", "stages:\n  - name: index\n    params: {foo: 1}\n")
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(p), "--input", "x.tar",
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode == 2 and "params.foo" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()  # rejected before any work
    good = ROOT / "pipelines" / "index.yaml"
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(good), "--input",
                        str(tmp_path / "missing.tar"), "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing.tar" in r.stderr and "Traceback" not in r.stderr


def test_resolved_config_versions_and_fingerprints_saved(pool: Path, tmp_path: Path):
    s = run_pipeline(make_pipeline("index"), make_config(str(pool / "00000.tar"), tmp_path / "w"))
    d = tmp_path / "w" / "runs" / s.run_id
    rec = json.loads((d / "run.json").read_text())
    assert rec["versions"]["pyarrow"] and rec["stages"][0]["fingerprint"]
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["executor"]["kind"] == "inprocess"
    assert yaml.safe_load((d / "pipeline.yaml").read_text())["stages"][0]["name"] == "index"


def test_demo_pipeline_names_the_scorer_the_demo_trains():
    from curate.tools.demo import SCORER

    pipe = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    assert next(s.params["pretrained"] for s in pipe.stages if s.name == "clip_score") == SCORER
