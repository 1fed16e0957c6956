"""recaption: both backends without downloads (a tiny BLIP built from a config for transformers,
open_clip's CoCa architecture with seeded random weights), deterministic captions whatever the
batch, broken images, captioning only one filter's drops, export of both captions, and mistakes
named in preflight in seconds."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import polars as pl
import pytest

from curate.core.config import ConfigError
from curate.engine import make_executor
from curate.io.parquet import RefusedOutput, read_meta
from curate.report.export import ExportSpec, export
from curate.runner.pipeline import run_pipeline
from tests.conftest import jpeg_bytes, make_config, make_pipeline, write_tar

WORDS = "a photo of red green blue circle square triangle star on the white background two three".split()


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A BLIP captioner with random weights (seed 0) and a 20-word vocabulary, saved as a local
    model directory: what a user's downloaded BLIP looks like to the stage."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    out = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = BlipConfig(vision_config=dict(image_size=32, patch_size=8, **small),
                     text_config=dict(vocab_size=len(vocab), bos_token_id=5, pad_token_id=0, sep_token_id=3,
                                      eos_token_id=3, max_position_embeddings=64, **small))
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
                  ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def photo_pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recappool")
    colours = [(200, 30, 30), (30, 160, 40), (30, 40, 200), (220, 200, 30), (120, 120, 120)]
    members = []
    for i, c in enumerate(colours):
        size = (300, 240) if i != 4 else (64, 48)  # the last one is small: the image filter drops it
        members += [(f"s{i}.jpg", jpeg_bytes(size, c)), (f"s{i}.txt", f"picture number {i}".encode())]
    members += [("bad.jpg", b"\xff\xd8 no jpeg"), ("bad.txt", b"a broken picture")]
    write_tar(out / "00000.tar", members)
    return out


def _captions(work: Path) -> dict[str, str | None]:
    t = pl.read_parquet(work / "recaption" / "*.parquet").join(
        pl.read_parquet(work / "index" / "*.parquet", columns=["uid", "key"]), on="uid")
    return dict(zip(t["key"].to_list(), t["caption_synthetic"].to_list()))


def _blip(model: Path, **extra) -> tuple[str, dict]:
    return ("recaption", {"backend": "transformers", "model": str(model), "max_new_tokens": 6} | extra)


def test_transformers_backend_is_deterministic_whatever_the_batch(tiny_blip: Path, photo_pool: Path, tmp_path: Path):
    s = run_pipeline(make_pipeline(_blip(tiny_blip, batch_size=2)), make_config(str(photo_pool / "*.tar"), tmp_path / "a"))
    assert s.ok, s.problems()
    got = _captions(tmp_path / "a")
    assert all(isinstance(got[f"s{i}"], str) and got[f"s{i}"] for i in range(5))
    assert all(w in WORDS for i in range(5) for w in got[f"s{i}"].split())  # the model's own vocabulary
    assert got["bad"] is None  # undecodable: no caption, no crash
    s = run_pipeline(make_pipeline(_blip(tiny_blip, batch_size=5)), make_config(str(photo_pool / "*.tar"), tmp_path / "b"))
    assert s.ok and _captions(tmp_path / "b") == got
    meta = read_meta(next((tmp_path / "a" / "recaption").glob("*.parquet")))
    info = meta["describe"]
    assert info["architecture"] == "BlipForConditionalGeneration" and info["decoding"] == "greedy"
    assert info["max_new_tokens"] == 6 and info["transformers_version"]
    beams = run_pipeline(make_pipeline(_blip(tiny_blip, num_beams=3, prompt="a photo of")),
                         make_config(str(photo_pool / "*.tar"), tmp_path / "c"))
    assert beams.ok and all(isinstance(v, str) for k, v in _captions(tmp_path / "c").items() if k != "bad")


def test_open_clip_coca_backend_runs_and_repeats(photo_pool: Path, tmp_path: Path):
    """CoCa's architecture with seeded random weights: plumbing and determinism (the words are junk)."""
    stage = ("recaption", {"model": "curate-tiny-coca", "pretrained": None, "max_new_tokens": 8, "batch_size": 3})
    s = run_pipeline(make_pipeline(stage), make_config(str(photo_pool / "*.tar"), tmp_path / "a"))
    assert s.ok, s.problems()
    got = _captions(tmp_path / "a")
    assert all(isinstance(got[f"s{i}"], str) for i in range(5)) and got["bad"] is None
    again = run_pipeline(make_pipeline(stage), make_config(str(photo_pool / "*.tar"), tmp_path / "b"))
    assert again.ok and _captions(tmp_path / "b") == got


def test_dropped_by_captions_only_what_that_filter_alone_dropped(tiny_blip: Path, photo_pool: Path, tmp_path: Path):
    pipe = make_pipeline(("image", {"min_side": 100}), _blip(tiny_blip, dropped_by="image"))
    s = run_pipeline(pipe, make_config(str(photo_pool / "*.tar"), tmp_path / "w"))
    assert s.ok, s.problems()
    got = _captions(tmp_path / "w")
    assert isinstance(got["s4"], str) and all(got[f"s{i}"] is None for i in range(4))


def test_export_writes_either_caption_or_both(tiny_blip: Path, photo_pool: Path, tmp_path: Path):
    cfg = make_config(str(photo_pool / "*.tar"), tmp_path / "w")
    assert run_pipeline(make_pipeline(("image", {"min_side": 10}), _blip(tiny_blip)), cfg).ok  # drops the broken one
    syn = _captions(tmp_path / "w")
    with make_executor(cfg) as ex:
        export(str(tmp_path / "w"), tmp_path / "both", ex, ExportSpec(caption="both"))
        export(str(tmp_path / "w"), tmp_path / "syn", ex, ExportSpec(caption="synthetic"))
    with tarfile.open(tmp_path / "both" / "shards" / "00000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    keys = sorted({n.split(".")[0] for n in members})
    assert len(keys) == 5
    for k in keys:
        info = json.loads(members[f"{k}.json"])
        assert members[f"{k}.txt"].decode() == info["caption"]
        assert members[f"{k}.synthetic.txt"].decode() == info["caption_synthetic"] == syn[info["key"]]
    import webdataset as wds

    rows = list(wds.WebDataset(str(tmp_path / "both" / "shards" / "00000.tar"), shardshuffle=False)
                .to_tuple("txt", "synthetic.txt"))
    assert len(rows) == 5 and all(a != b for a, b in rows)
    # open_clip's own training loader reads the export: every sample once, its .txt as the text
    from types import SimpleNamespace

    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(val_data=str(tmp_path / "both" / "shards" / "00000.tar"), val_num_samples=5, batch_size=2,
                           workers=0, world_size=1, seed=0, train_data_upsampling_factors=None)
    data = get_wds_dataset(args, lambda im: im.size[0], is_train=False, tokenizer=lambda t: [t])
    texts = [t for _, batch in data.dataloader for t in batch]
    assert sorted(texts) == sorted(a.decode() for a, _ in rows)
    with tarfile.open(tmp_path / "syn" / "shards" / "00000.tar") as tf:
        texts = {m.name: tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")}
    assert not any(n.endswith(".synthetic.txt") for n in texts) and sorted(texts.values()) == sorted(
        v for v in syn.values() if v)


def test_mistakes_are_named_in_preflight(tiny_blip: Path, photo_pool: Path, tmp_path: Path):
    cases = [(("recaption", {"backend": "transformers", "model": str(tmp_path / "no-such-model")}), "not found offline"),
             (("recaption", {"model": "curate-tiny", "pretrained": None}), "not a captioning model"),
             (("recaption", {"model": "curate-tiny-coca", "pretrained": "missing.pt"}), "missing.pt"),
             (("recaption", {"model": "curate-tiny-coca", "pretrained": None, "dropped_by": "clip_rank"}),
              "not an earlier filter")]
    for stage, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            run_pipeline(make_pipeline(stage), make_config(str(photo_pool / "*.tar"), tmp_path / "w"))
    assert not (tmp_path / "w" / "recaption").exists()
    plain = tmp_path / "plain"
    assert run_pipeline(make_pipeline(("image", {})), make_config(str(photo_pool / "*.tar"), plain)).ok
    with make_executor(make_config(str(photo_pool / "*.tar"), plain)) as ex, \
            pytest.raises(RefusedOutput, match="run a recaption stage"):
        export(str(plain), tmp_path / "o", ex, ExportSpec(caption="both"))


def test_clip_score_scores_the_synthetic_caption(tiny_blip: Path, photo_pool: Path, tmp_path: Path, tiny_ckpt: Path):
    clip = {"model": "curate-tiny", "pretrained": str(tiny_ckpt), "batch_size": 4, "store_embeddings": False}
    from curate.core.config import PipelineConfig, StageSpec

    name, blip = _blip(tiny_blip)
    pipe = PipelineConfig(name="t", stages=[
        StageSpec(name="image", params={"min_side": 10}), StageSpec(name=name, params=blip),
        StageSpec(name="clip_score", params=clip),
        StageSpec(name="clip_score", id="clip_syn", params=clip | {"caption_from": "recaption"})])
    s = run_pipeline(pipe, make_config(str(photo_pool / "*.tar"), tmp_path / "a"))
    assert s.ok, s.problems()
    alt = pl.read_parquet(tmp_path / "a" / "clip_score" / "*.parquet").sort("uid")
    syn = pl.read_parquet(tmp_path / "a" / "clip_syn" / "*.parquet").sort("uid")
    scored = syn.filter(pl.col("clip_score").is_not_null())
    assert scored.height == 5 and alt.filter(pl.col("clip_score").is_not_null()).height == 5
    assert syn["clip_score"].to_list() != alt["clip_score"].to_list()  # other captions, other scores
    # captions written only for the image filter's drops: the survivors have none to score
    pipe = make_pipeline(("image", {"min_side": 100}), _blip(tiny_blip, dropped_by="image"),
                         ("clip_score", clip | {"caption_from": "recaption"}))
    s = run_pipeline(pipe, make_config(str(photo_pool / "*.tar"), tmp_path / "b"))
    assert s.ok, s.problems()
    none = pl.read_parquet(tmp_path / "b" / "clip_score" / "*.parquet")
    assert set(none["reason_clip_score"].drop_nulls().to_list()) == {"clip:no_caption"}
    assert none["reason_clip_score"].drop_nulls().len() == 4
    with pytest.raises(ConfigError, match="caption_from names a recaption stage"):
        run_pipeline(make_pipeline(("image", {}), ("clip_score", clip | {"caption_from": "image"})),
                     make_config(str(photo_pool / "*.tar"), tmp_path / "c"))


def test_a_rescued_pair_is_exported_with_its_synthetic_caption():
    from curate.report.export import caption_members

    row = {"caption": "IMG_0042.jpg", "caption_synthetic": "a red car on a street", "rescued": True}
    assert caption_members("k", row, "original") == [("k.txt", b"a red car on a street")]
    assert caption_members("k", row | {"rescued": False}, "original") == [("k.txt", b"IMG_0042.jpg")]
    assert caption_members("k", row | {"rescued": False}, "both") == [("k.txt", b"IMG_0042.jpg"),
                                                                     ("k.synthetic.txt", b"a red car on a street")]
    assert caption_members("k", {"caption": "a dog"}, "synthetic") == [("k.txt", b"a dog")]
