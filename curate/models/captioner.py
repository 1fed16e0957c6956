"""Image captioning models, deterministic by default, for the ``recaption`` stage.

Two backends, chosen by ``backend``:

- ``open_clip``: a CoCa model (``coca_ViT-L-14``, our ``curate-tiny-coca``...) loaded as
  ``clip_score`` loads models (a name + a tag from the model cache, or a local checkpoint), so one
  model can both caption and score; greedy decoding by default (``greedy_coca``), open_clip's
  ``generate`` beam search with ``num_beams`` > 1.
- ``transformers``: an image-to-text or vision-language model of Hugging Face ``transformers``
  (BLIP, BLIP-2, Florence-2, Qwen2-VL-class models) from a local directory or the HF cache,
  offline, with an optional prompt; ``generate`` without sampling (greedy or beam search).

A captioner turns a batch of PIL images into one string each; the same images give the same
strings on every run (no sampling, fixed batch shapes do not matter to greedy decoding in fp32).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

from curate.models.clip_registry import ModelError


@dataclass
class Captioner:
    """``caption(images)`` -> one string per PIL image; ``info``: what made them (file metadata)."""

    caption: Callable[[list], list[str]]
    info: dict[str, Any] = field(default_factory=dict)


def _clean(text: str) -> str:
    for tok in ("<start_of_text>", "<end_of_text>"):
        text = text.replace(tok, " ")
    return " ".join(text.split()).strip(" .") if text else ""


SOT, EOT = 49406, 49407  # open_clip's tokenizer: start and end of text


def _until_end(tokens):
    """The tokens up to the first end-of-text (what follows is padding)."""
    ends = (tokens == EOT).nonzero()
    return tokens[: int(ends[0]) + 1] if len(ends) else tokens


def greedy_coca(model, images, seq_len: int, min_len: int = 5):
    """Greedy decoding of an open_clip CoCa model: at each step the most probable token (the first
    of equal ones), end-of-text barred before ``min_len`` tokens as open_clip's ``generate`` bars
    it. open_clip's own greedy route samples among the top-k tokens, which draws at random when
    scores tie (an untrained model); this one is the same on every run."""
    import torch

    latent, embs = model._encode_image(images)
    out = torch.full((images.shape[0], 1), SOT, dtype=torch.long, device=images.device)
    done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    for step in range(seq_len - 1):
        logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        if step + 1 < min_len:
            logits[:, EOT] = float("-inf")
        nxt = torch.full_like(done, EOT, dtype=torch.long) if step == seq_len - 2 else logits.argmax(dim=-1)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == EOT
        if bool(done.all()):
            break
    return out


def open_clip_captioner(model: str, pretrained: str | None, *, device: str = "cpu", model_cache: str | None = None,
                        max_new_tokens: int = 20, num_beams: int = 1) -> Captioner:
    import open_clip
    import torch
    from open_clip import coca_model

    from curate.models.clip import load_clip

    if not coca_model._has_transformers:
        raise ModelError("open_clip's CoCa generate needs transformers < 4.57 (it uses BeamSearchScorer): "
                         "pip install 'curate[caption]' (make install installs it)")
    loaded = load_clip(model, pretrained, device=device, model_cache=model_cache)
    if not hasattr(loaded.model, "generate"):
        raise ModelError(f"{model} is not a captioning model (open_clip's CoCa models are: coca_ViT-B-32, "
                         "coca_ViT-L-14, curate-tiny-coca)")
    # generate's sequence length counts the start token; it must exceed its minimum length (5)
    seq_len = max(max_new_tokens + 1, 6)

    def caption(images: list) -> list[str]:
        batch = torch.stack([loaded.preprocess(im) for im in images]).to(device)
        with torch.no_grad():
            if num_beams > 1:
                tokens = loaded.model.generate(batch, seq_len=seq_len, generation_type="beam_search",
                                               num_beams=num_beams, num_beam_groups=1)
            else:
                tokens = greedy_coca(loaded.model, batch, seq_len)
        return [_clean(open_clip.decode(_until_end(t))) for t in tokens]

    info = loaded.info | {"backend": "open_clip", "max_new_tokens": max_new_tokens, "num_beams": num_beams,
                          "decoding": "beam search" if num_beams > 1 else "greedy"}
    return Captioner(caption, info)


def transformers_captioner(model: str, *, device: str = "cpu", prompt: str | None = None, max_new_tokens: int = 20,
                           num_beams: int = 1, dtype: str = "fp32") -> Captioner:
    import torch
    import transformers
    from transformers import AutoProcessor

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        net = None
        for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            cls = getattr(transformers, auto, None)
            if cls is None:
                continue
            with contextlib.suppress(ValueError):
                net = cls.from_pretrained(model, local_files_only=True, dtype=torch_dtype)
                break
        if net is None:
            raise ModelError(f"{model}: not an image-to-text model transformers can load")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {model} offline (a local directory or a model in the HF cache): {e}") from None
    net = net.to(device).eval()

    def caption(images: list) -> list[str]:
        kwargs = {"images": [im.convert("RGB") for im in images], "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = processor(**kwargs).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        with torch.no_grad():
            out = net.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        if prompt and "input_ids" in inputs and not net.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder-only model repeats its prompt
        return [_clean(t) for t in processor.batch_decode(out, skip_special_tokens=True)]

    info = {"backend": "transformers", "model": model, "transformers_version": transformers.__version__,
            "architecture": type(net).__name__, "prompt": prompt, "max_new_tokens": max_new_tokens,
            "num_beams": num_beams, "decoding": "beam search" if num_beams > 1 else "greedy", "dtype": dtype}
    return Captioner(caption, info)
