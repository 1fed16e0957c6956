"""The scoring forward's speed-ups against open_clip's own eager fp32 forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.core.config import ConfigError, RunConfig
from curate.runner.pipeline import preflight
from curate.io.layout import WorkDir
from curate.models import dali_preprocess
from curate.models.clip import load_clip
from curate.models.clip_forward import ClipForward, attention_kernels, causal_eot_pooled, encode_text_prefix
from curate.stages.clip_score import ClipScoreStage

CAPTIONS = ["a red square", "", "a dog", "a red square", "two blue circles on a white table " * 20,
            "a dog", "x", "a photo of a small green triangle next to a large yellow star"]


def _reference(clip, images, tokens):
    with torch.inference_mode():
        fi = torch.nn.functional.normalize(clip.model.encode_image(images), dim=-1)
        ft = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)
    return (fi * ft).sum(-1).numpy(), fi.numpy(), ft.numpy()


def _images(clip, n: int, seed: int = 0):
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model", ["curate-tiny", "ViT-B-32"])
def test_text_prefix_equals_the_full_context(model: str):
    """Cutting the tokens after the longest end-of-text changes nothing: a caption that fills the
    whole context (its end-of-text last), an empty one, lengths across the cut."""
    torch.manual_seed(0)
    clip = load_clip(model, None)
    assert causal_eot_pooled(clip.model)
    tokens = clip.tokenizer(CAPTIONS)
    assert int(tokens.argmax(-1).max()) == tokens.shape[1] - 1  # the long caption reaches the end
    short = tokens[[0, 1, 2, 6]]
    end = int(short.argmax(-1).max()) + 1
    with torch.inference_mode():
        for t, cut in ((tokens, tokens.shape[1]), (short, end), (short, end + 5)):
            full = clip.model.encode_text(t)
            assert torch.allclose(encode_text_prefix(clip.model, t[:, :cut]), full, atol=1e-5, rtol=0)


def test_forward_equals_eager_and_encodes_each_caption_once(monkeypatch):
    torch.manual_seed(0)
    clip = load_clip("curate-tiny", None)
    tokens = clip.tokenizer(CAPTIONS)
    images = _images(clip, len(CAPTIONS))
    ref = _reference(clip, images, tokens)
    fwd = ClipForward(clip, "cpu", batch_size=4, text_cache=3)
    encoded: list[int] = []
    inner = fwd.encode_text
    monkeypatch.setattr(fwd, "encode_text", lambda t: encoded.append(len(t)) or inner(t))
    score, ie, te = fwd(images, tokens)
    assert np.abs(score - ref[0]).max() < 1e-5
    assert np.abs(ie.astype(np.float32) - ref[1]).max() < 1e-3 and ie.dtype == np.float16  # float16 storage
    assert np.abs(te.astype(np.float32) - ref[2]).max() < 1e-3
    assert sum(encoded) == len(set(CAPTIONS)) == 6  # in batches of at most 4
    assert len(fwd.cache) == 3  # the three most recent distinct captions
    encoded.clear()
    fwd(images[:2], tokens[[6, 7]])  # both cached
    assert encoded == []
    fwd(images[:2], tokens[[0, 7]])  # "a red square" was evicted
    assert encoded == [1]
    fwd.reset_cache()
    assert len(fwd.cache) == 0


def test_bf16_weights_within_tolerance_of_fp32():
    """bf16 weights (not autocast): inputs follow the weights' type, scores stay within 2e-2 of the
    fp32 reference on random weights (bf16 keeps 8 bits of mantissa)."""
    torch.manual_seed(0)
    ref_clip = load_clip("curate-tiny", None)
    state = ref_clip.model.state_dict()
    clip = load_clip("curate-tiny", None, precision="bf16")
    clip.model.load_state_dict(state)
    assert clip.model.visual.conv1.weight.dtype == torch.bfloat16
    tokens = ref_clip.tokenizer(CAPTIONS)
    images = _images(ref_clip, len(CAPTIONS))
    score, _, _ = ClipForward(clip, "cpu", precision="bf16", batch_size=8)(images, tokens)
    assert np.abs(score - _reference(ref_clip, images, tokens)[0]).max() < 2e-2


@pytest.mark.slow
def test_compiled_forward_equals_eager_with_a_short_last_batch():
    """torch.compile (inductor) with the batch padded to one shape: the same scores as eager, for
    a full batch and a short last one."""
    torch.manual_seed(0)
    clip = load_clip("curate-tiny", None)
    tokens = clip.tokenizer(CAPTIONS + ["a cat"] * 3)
    images = _images(clip, len(tokens), seed=1)
    eager, compiled = ClipForward(clip, "cpu", batch_size=8), ClipForward(clip, "cpu", batch_size=8, compile=True)
    for a, b in ((0, 8), (8, 11)):
        e, c = eager(images[a:b], tokens[a:b]), compiled(images[a:b], tokens[a:b])
        assert len(c[0]) == b - a
        assert np.abs(e[0] - c[0]).max() < 1e-4


def test_attention_runs_through_fused_kernels():
    clip = load_clip("curate-tiny", None)
    tokens = clip.tokenizer(CAPTIONS[:2])
    kernels = attention_kernels(clip.model.encode_text, tokens) + attention_kernels(clip.model.encode_image,
                                                                                    _images(clip, 2))
    assert any("scaled_dot_product" in k or "native_multi_head" in k for k in kernels), kernels


def test_dali_decoder_without_dali_fails_preflight(monkeypatch, tmp_path):
    monkeypatch.setattr(dali_preprocess, "dali_available", lambda: False)
    st = ClipScoreStage(ClipScoreStage.Params(model="curate-tiny", pretrained=None, device_decoder="dali"))
    with pytest.raises(ConfigError, match="device_decoder is dali but NVIDIA DALI is not installed"):
        preflight([st], RunConfig(), [], WorkDir.at(tmp_path / "w"))
    off = ClipScoreStage(ClipScoreStage.Params(model="curate-tiny", pretrained=None, device_decoder="dali",
                                               device_decode=False))
    preflight([off], RunConfig(), [], WorkDir.at(tmp_path / "w"))  # not decoding on the device: no DALI needed
