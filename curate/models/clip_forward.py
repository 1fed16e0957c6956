"""The CLIP forward pass as the scoring stage runs it: open_clip's towers with exact speed-ups.

``ClipForward(clip, device, ...)(images, tokens)`` gives the cosine scores and the L2-normalised
image and text embeddings of a batch. Each speed-up computes what open_clip's own forward does,
to rounding (the tests compare against ``encode_image``/``encode_text`` in fp32):

- ``precision``: ``auto`` keeps fp32 weights under bf16 autocast on CUDA (fp32 on the CPU);
  ``fp32`` is the eager reference; ``bf16``/``fp16`` cast the weights themselves (half the memory
  traffic) and feed the towers inputs of that type.
- ``compile``: ``torch.compile`` of both towers with static shapes: the image batch is padded to
  the stage's batch size, the text batch to that size and to a few lengths; on CUDA with CUDA
  graphs ("reduce-overhead").
- channels-last patch embedding on CUDA (the convolution's fast layout).
- the text tower runs on the batch's distinct captions only, and on the tokens up to the longest
  caption's end-of-text (rounded up to a multiple of ``TEXT_LENGTH_STEP``). This holds for causal
  towers that pool at the end-of-text token (OpenAI-style CLIP): no position after it can reach it.
  Other towers get the full context. Embeddings of captions already seen in this shard come from a
  cache (``text_cache`` captions, least recently used dropped first).
- ``batch_invariant``: every forward has one shape (image and text batches padded to the batch
  size, the text at its full context), so a sample's score and embeddings are the same bits whatever
  shard, batch or position it lands in (CPU kernels compute a row alike at any position of a batch
  of one shape, not across shapes); without it, the text cut and a short last batch change the
  last bits with the batch-mates.
- attention runs through torch's fused scaled-dot-product kernels (``nn.MultiheadAttention``'s
  inference path calls them; ``attention_kernels`` names the kernels a forward used).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

TEXT_LENGTH_STEP = 16


class ClipForward:
    def __init__(self, clip: Any, device: str, *, precision: str = "auto", compile: bool = False,
                 batch_size: int = 256, text_cache: int = 0, batch_invariant: bool = False):
        import torch
        from open_clip import get_input_dtype

        self.model, self.device, self.batch_size = clip.model, device, batch_size
        self.input_dtype = get_input_dtype(precision)  # None: fp32 weights, float32 inputs
        self.autocast = device == "cuda" and precision == "auto"
        self.channels_last = device == "cuda" and hasattr(getattr(self.model, "visual", None), "conv1")
        if self.channels_last:
            self.model.visual.conv1.to(memory_format=torch.channels_last)
        # batch_invariant: every forward has one shape (padded batches, the full text context), so a
        # sample's result is the same bits whatever batch it lands in
        self.batch_invariant = batch_invariant
        self.trims_text = causal_eot_pooled(self.model) and not batch_invariant
        self.compiled = compile
        self.pads = compile or batch_invariant
        self.encode_image = self.model.encode_image
        self.encode_text = self._text_features
        if compile:
            import torch._dynamo

            # one image shape; text: one batch size times a few lengths
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
            mode = "reduce-overhead" if device == "cuda" else None
            self.encode_image = torch.compile(self.model.encode_image, dynamic=False, mode=mode)
            self.encode_text = torch.compile(self._text_features, dynamic=False, mode=mode)
        self.cache_size = text_cache
        self.cache: OrderedDict[bytes, Any] = OrderedDict()

    def reset_cache(self) -> None:
        """Forget cached caption embeddings (the stage does so per shard: a shard's scores then
        depend on that shard alone)."""
        self.cache.clear()

    def __call__(self, images, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores float32, image embeddings float16, text embeddings float16) for a batch."""
        import torch

        with torch.inference_mode(), torch.autocast(device_type="cuda" if self.autocast else "cpu",
                                                    dtype=torch.bfloat16, enabled=self.autocast):
            fi = self.image_features(images)
            ft = self.text_embeddings(tokens)
            score = (fi * ft).sum(-1)
        return (score.cpu().numpy(), fi.cpu().numpy().astype(np.float16), ft.cpu().numpy().astype(np.float16))

    def image_features(self, images):
        """L2-normalised float32 image embeddings."""
        import torch

        n = len(images)
        x = images.to(self.device, non_blocking=True)
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        if self.pads and n < self.batch_size:
            x = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.encode_image(x)[:n].float()
        return torch.nn.functional.normalize(out, dim=-1)

    def text_embeddings(self, tokens):
        """L2-normalised float32 text embeddings, each distinct caption encoded once."""
        import torch

        keys = [row.tobytes() for row in tokens.numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        fresh = {}
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            todo = tokens[[first[k] for k in missing]]
            feats = torch.cat([self._encode_distinct(todo[s:s + self.batch_size])
                               for s in range(0, len(todo), self.batch_size)])
            fresh = dict(zip(missing, feats))
        rows = []
        for k in keys:
            if k in fresh:
                rows.append(fresh[k])
            else:
                rows.append(self.cache[k])
                self.cache.move_to_end(k)
        if self.cache_size:
            for k, v in fresh.items():
                self.cache[k] = v
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return torch.stack(rows)

    def _encode_distinct(self, tokens):
        import torch

        n = len(tokens)
        if self.trims_text:
            end = int(tokens.argmax(dim=-1).max()) + 1
            length = min(tokens.shape[1], -(-end // TEXT_LENGTH_STEP) * TEXT_LENGTH_STEP)
            tokens = tokens[:, :length]
        if self.pads and n < self.batch_size:
            tokens = torch.cat([tokens, tokens[:1].expand(self.batch_size - n, -1)])
        out = self.encode_text(tokens.to(self.device, non_blocking=True))[:n].float()
        return torch.nn.functional.normalize(out, dim=-1)

    def _text_features(self, tokens):
        if self.trims_text:
            return encode_text_prefix(self.model, tokens)
        return self.model.encode_text(tokens)


def causal_eot_pooled(model: Any) -> bool:
    """True for open_clip's CLIP class with a causal text tower that pools at the highest token
    id (the end-of-text token), the only kind ``encode_text_prefix`` handles."""
    import open_clip

    return (type(model) is open_clip.model.CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax")


def encode_text_prefix(model: Any, tokens):
    """open_clip ``CLIP.encode_text`` for tokens cut after their longest end-of-text: the same
    modules, with the positional embedding and the causal mask cut to the same length."""
    import torch
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, "argmax")
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def attention_kernels(fn: Any, *args: Any) -> list[str]:
    """The attention operators ``fn(*args)`` ran, by name (e.g. the fused
    ``aten::_scaled_dot_product_flash_attention``), from torch's profiler."""
    import torch
    from torch.profiler import profile

    with torch.inference_mode(), profile() as prof:
        fn(*args)
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::")})
