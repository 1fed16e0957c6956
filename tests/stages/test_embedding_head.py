from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from curate.models.clip import embed_dim
from tests.conftest import make_config, make_pipeline

TINY = {"model": "curate-tiny", "pretrained": None}


def _laion_style_head(path: Path, d: int) -> torch.nn.Module:
    """LAION's aesthetic MLP layout: Linear/Dropout stack, no activations, one output."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Dropout(0.2), torch.nn.Linear(64, 16),
                                 torch.nn.Linear(16, 1))
    head = torch.nn.Module()
    head.layers = layers
    torch.save(head.state_dict(), path)
    return layers.eval()


def test_head_scores_equal_the_module_on_the_stored_embeddings(pool: Path, tmp_path: Path):
    d = embed_dim("curate-tiny")
    ref = _laion_style_head(tmp_path / "head.pth", d)
    work = tmp_path / "w"
    params = {"checkpoint": str(tmp_path / "head.pth")}
    assert run_pipeline(make_pipeline(("clip_score", TINY), ("embedding_head", params)),
                        make_config(str(pool / "*.tar"), work)).ok
    t = pl.read_parquet(work / "embedding_head" / "*.parquet").join(
        pl.read_parquet(work / "clip_score" / "*.parquet", columns=["uid", "image_emb"]), on="uid")
    scored = t.filter(pl.col("head_score").is_not_null())
    assert scored.height > 300 and scored["keep_embedding_head"].all()  # no threshold: nothing dropped
    emb = torch.tensor(np.array(scored["image_emb"].to_list(), dtype=np.float32))
    want = ref(emb / emb.norm(dim=1, keepdim=True)).squeeze(1).detach().numpy()
    np.testing.assert_allclose(scored["head_score"].to_numpy(), want, rtol=1e-4, atol=1e-5)

    # a threshold drops with the stage's own reason; a second head is a second stage with its own id
    median = float(np.median(want))
    pipe = make_pipeline(("clip_score", TINY), ("embedding_head", params | {"min_score": median}))
    pipe.stages[-1] = pipe.stages[-1].model_copy(update={"id": "aesthetic"})
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work)).ok
    a = pl.read_parquet(work / "aesthetic" / "*.parquet").filter(pl.col("head_score").is_not_null())
    assert set(a.filter(~pl.col("keep_aesthetic"))["reason_aesthetic"]) == {"aesthetic:below_min"}
    assert (a.filter(pl.col("keep_aesthetic"))["head_score"] >= median).all()


def test_broken_checkpoints_are_named_before_any_work(pool: Path, tmp_path: Path):
    d = embed_dim("curate-tiny")
    cases = {"missing.pth": "not found"}
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    cases["garbage.pth"] = "cannot read"
    torch.save({"layers.0.weight": torch.zeros(8, d + 1), "layers.0.bias": torch.zeros(8),
                "layers.1.weight": torch.zeros(1, 8)}, tmp_path / "wrong_dim.pth")
    cases["wrong_dim.pth"] = f"{d + 1}-d inputs"
    torch.save({"a.weight": torch.zeros(8, d), "b.weight": torch.zeros(1, 9)}, tmp_path / "no_chain.pth")
    cases["no_chain.pth"] = "do not chain"
    torch.save({"a.weight": torch.zeros(3, d)}, tmp_path / "three.pth")
    cases["three.pth"] = "3 outputs"
    torch.save({"scale": torch.ones(3)}, tmp_path / "no_linear.pth")
    cases["no_linear.pth"] = "no Linear layer"
    for name, msg in cases.items():
        with pytest.raises(ConfigError, match=msg):
            run_pipeline(make_pipeline(("clip_score", TINY), ("embedding_head", {"checkpoint": str(tmp_path / name)})),
                         make_config(str(pool / "*.tar"), tmp_path / f"w-{name}"))
    with pytest.raises(ConfigError, match="stores none"):
        run_pipeline(make_pipeline(("clip_score", TINY | {"store_embeddings": False}),
                                   ("embedding_head", {"checkpoint": str(tmp_path / "three.pth")})),
                     make_config(str(pool / "*.tar"), tmp_path / "w-none"))
