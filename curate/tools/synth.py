"""Synthetic benchmark pool: simple scenes with describing captions, injected defects, ground truth.

Sample ``i`` depends only on ``(seed, i)``, so the same pool split into a different number of
shards holds byte-identical samples with the same uids (used by the determinism tests).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# Bumped when the generator's output changes: caches of pools and models trained on them key on it.
# SYNTH_VERSION: the clean sets (the demo scorer's training and held-out pairs); POOL_VERSION: pools
# with defects (3: half the near duplicates cut at one or two sides).
SYNTH_VERSION = 2
POOL_VERSION = 3

# A long-tailed concept distribution: Zipf-like weights over shapes (circle dominates).
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon"]
SHAPE_WEIGHTS = np.array([1 / (r + 1) ** 1.3 for r in range(len(SHAPES))])
SHAPE_WEIGHTS /= SHAPE_WEIGHTS.sum()
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 20),
          "purple": (140, 40, 170), "orange": (250, 140, 10), "pink": (250, 120, 190),
          "brown": (120, 70, 20), "black": (15, 15, 15), "white": (245, 245, 245)}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (225, 210, 170), "dark": (40, 45, 55),
               "light blue": (180, 210, 240), "light green": (190, 230, 180)}
COUNTS = {1: "one", 2: "two", 3: "three"}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top",
             "bottom": "at the bottom", "center": "in the center"}
TEMPLATES = [
    "a photo of {n} {c} {s} {p}",
    "{n} {c} {s} {p} on a {bg} background",
    "a picture with {n} {c} {s} {p}",
    "there are {n} {c} {s} {p} of the frame",
    "a simple drawing of {n} {c} {s} {p}, {bg} background",
]
# Non-English captions: the same scenes described in real languages (short, grammatical enough
# for fastText to recognise).
FOREIGN = {
    "de": ("Ein Foto mit {n} {c} Formen ({s}) auf einem hellen Hintergrund, sehr schön und einfach",
           {"one": "einer", "two": "zwei", "three": "drei"},
           {"red": "roten", "green": "grünen", "blue": "blauen", "yellow": "gelben", "purple": "violetten",
            "orange": "orangen", "pink": "rosa", "brown": "braunen", "black": "schwarzen", "white": "weißen"},
           {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "cross": "Kreuz",
            "diamond": "Raute", "ring": "Ring", "hexagon": "Sechseck"}),
    "fr": ("Une photo avec {n} formes {c} ({s}) sur un fond clair, très belle et simple",
           {"one": "une", "two": "deux", "three": "trois"},
           {"red": "rouges", "green": "vertes", "blue": "bleues", "yellow": "jaunes", "purple": "violettes",
            "orange": "oranges", "pink": "roses", "brown": "brunes", "black": "noires", "white": "blanches"},
           {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile", "cross": "croix",
            "diamond": "losange", "ring": "anneau", "hexagon": "hexagone"}),
    "es": ("Una foto con {n} formas {c} ({s}) sobre un fondo claro, muy bonita y sencilla",
           {"one": "una", "two": "dos", "three": "tres"},
           {"red": "rojas", "green": "verdes", "blue": "azules", "yellow": "amarillas", "purple": "moradas",
            "orange": "naranjas", "pink": "rosadas", "brown": "marrones", "black": "negras", "white": "blancas"},
           {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella",
            "cross": "cruz", "diamond": "rombo", "ring": "anillo", "hexagon": "hexágono"}),
    "it": ("Una foto con {n} forme {c} ({s}) su uno sfondo chiaro, molto bella e semplice",
           {"one": "una", "two": "due", "three": "tre"},
           {"red": "rosse", "green": "verdi", "blue": "blu", "yellow": "gialle", "purple": "viola",
            "orange": "arancioni", "pink": "rosa", "brown": "marroni", "black": "nere", "white": "bianche"},
           {"circle": "cerchio", "square": "quadrato", "triangle": "triangolo", "star": "stella",
            "cross": "croce", "diamond": "rombo", "ring": "anello", "hexagon": "esagono"}),
    "pt": ("Uma foto com {n} formas {c} ({s}) em um fundo claro, muito bonita e simples",
           {"one": "uma", "two": "duas", "three": "três"},
           {"red": "vermelhas", "green": "verdes", "blue": "azuis", "yellow": "amarelas", "purple": "roxas",
            "orange": "laranjas", "pink": "rosas", "brown": "marrons", "black": "pretas", "white": "brancas"},
           {"circle": "círculo", "square": "quadrado", "triangle": "triângulo", "star": "estrela",
            "cross": "cruz", "diamond": "losango", "ring": "anel", "hexagon": "hexágono"}),
    "nl": ("Een foto met {n} {c} vormen ({s}) op een lichte achtergrond, heel mooi en eenvoudig",
           {"one": "één", "two": "twee", "three": "drie"},
           {"red": "rode", "green": "groene", "blue": "blauwe", "yellow": "gele", "purple": "paarse",
            "orange": "oranje", "pink": "roze", "brown": "bruine", "black": "zwarte", "white": "witte"},
           {"circle": "cirkel", "square": "vierkant", "triangle": "driehoek", "star": "ster", "cross": "kruis",
            "diamond": "ruit", "ring": "ring", "hexagon": "zeshoek"}),
}
JUNK = ["IMG_{d4}.jpg", "DSC_{d4}", "DSC{d4}.JPG", "image", "photo", "untitled", "Untitled-{d1}",
        "http://www.example.com/img/{hex}.jpg", "{word}", "{d6}", "!!! ...", "placeholder",
        "click here to enlarge", "no description available", "image.png"]

# Words rendered into the image of a ``text_caption`` sample, which its caption only repeats.
SIGN_TEXTS = ["SUMMER SALE", "GRAND OPENING", "FREE WIFI", "OPEN 24 HOURS", "HAPPY BIRTHDAY", "BEST PRICE",
              "NEW ARRIVALS", "THANK YOU", "BIG DEAL", "SOLD OUT", "HOT COFFEE", "PARKING ONLY"]
# Spam captions of ``templated_caption`` samples: one shop's template, only the item number varies.
SPAM = "Buy cheap stickers online, best price, free shipping worldwide, new designs daily, item no. {d5}"

DEFECTS = ["non_english", "junk_caption", "tiny_image", "extreme_aspect", "blank_image", "blurry",
           "corrupt_image", "mismatch", "exact_duplicate", "near_duplicate", "text_caption",
           "templated_caption"]
# text_caption and templated_caption are opt-in (``fractions``): the demo's pipeline has no text
# detector, and its pool stays as it was.
DEFAULT_FRACTIONS = {"non_english": 0.04, "junk_caption": 0.04, "tiny_image": 0.03,
                     "extreme_aspect": 0.03, "blank_image": 0.03, "blurry": 0.03, "corrupt_image": 0.02,
                     "mismatch": 0.06, "exact_duplicate": 0.03, "near_duplicate": 0.03}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    count: int
    position: str
    background: str

    def caption(self, rng: np.random.Generator) -> str:
        t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        s = self.shape + ("s" if self.count > 1 else "")
        return t.format(n=COUNTS[self.count], c=self.color, s=s, p=POSITIONS[self.position],
                        bg=self.background)


def random_scene(rng: np.random.Generator) -> Scene:
    shape = SHAPES[int(rng.choice(len(SHAPES), p=SHAPE_WEIGHTS))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    bgs = [b for b in BACKGROUNDS if not (b == "dark" and color == "black")]
    return Scene(shape, color, int(rng.integers(1, 4)), list(POSITIONS)[int(rng.integers(len(POSITIONS)))],
                 bgs[int(rng.integers(len(bgs)))])


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def poly(n: int, rot: float, radii: list[float]) -> list[tuple[float, float]]:
        pts = []
        for k in range(n * len(radii)):
            a = rot + 2 * np.pi * k / (n * len(radii))
            rr = radii[k % len(radii)]
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts

    return {
        "square": poly(4, np.pi / 4, [r * 1.2]),
        "triangle": poly(3, -np.pi / 2, [r * 1.2]),
        "star": poly(5, -np.pi / 2, [r * 1.25, r * 0.5]),
        "diamond": poly(4, 0, [r * 1.25]),
        "hexagon": poly(6, 0, [r * 1.1]),
        "cross": [(cx - r, cy - r / 3), (cx - r / 3, cy - r / 3), (cx - r / 3, cy - r), (cx + r / 3, cy - r),
                  (cx + r / 3, cy - r / 3), (cx + r, cy - r / 3), (cx + r, cy + r / 3),
                  (cx + r / 3, cy + r / 3), (cx + r / 3, cy + r), (cx - r / 3, cy + r),
                  (cx - r / 3, cy + r / 3), (cx - r, cy + r / 3)],
    }.get(shape, [])


def render(scene: Scene, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    # A random low-frequency shading (gradient + soft blobs) makes every scene's layout unique,
    # as photos are: without it, perceptual hashes of different simple scenes collide.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    shade = ((xx / w - 0.5) * np.cos(ang) + (yy / h - 0.5) * np.sin(ang)) * rng.uniform(40, 80)
    for _ in range(6):
        cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.3) * min(w, h)
        shade += rng.uniform(-60, 60) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad ** 2))
    # Mild texture so that sharpness (Laplacian variance) separates clean from blurred images.
    noise = rng.integers(-12, 13, size=(h, w, 1)).astype(np.float32)
    arr = np.clip(bg[None, None, :] + shade[..., None] + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    base = min(w, h)
    r = base * 0.11
    region = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
              "center": (0.5, 0.5)}[scene.position]
    offsets = {1: [(0, 0)], 2: [(-1, -1), (1, 1)], 3: [(-1, 1), (1, 1), (0, -1)]}[scene.count]
    fill = COLORS[scene.color]
    outline = (0, 0, 0) if scene.color != "black" else (255, 255, 255)
    for ox, oy in offsets:
        jitter = rng.uniform(-0.03, 0.03, size=2) * base
        cx = region[0] * w + ox * r * 1.15 + jitter[0]
        cy = region[1] * h + oy * r * 1.15 + jitter[1]
        rr = r * (0.75 if scene.count > 1 else 1.0)
        if scene.shape == "circle":
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill, outline=outline, width=2)
        elif scene.shape == "ring":
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=fill, width=max(3, int(rr / 3)))
        else:
            d.polygon(_shape_points(scene.shape, cx, cy, rr), fill=fill, outline=outline)
    return im


def render_text(im: Image.Image, text: str, rng: np.random.Generator) -> Image.Image:
    """``im`` with ``text`` across a band of it, large and legible (a poster, a sign, a banner), in
    Pillow's embedded font."""
    from PIL import ImageFont

    im = im.copy()
    w, h = im.size
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(12, int(w / (0.62 * len(text) + 2))))
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
    x = (w - (x1 - x0)) / 2 - x0
    y = rng.uniform(0.1, 0.7) * h - y0
    pad = 0.15 * (y1 - y0)
    d.rectangle([x + x0 - pad, y + y0 - pad, x + x1 + pad, y + y1 + pad], fill=(250, 250, 245))
    d.text((x, y), text, font=font, fill=(20, 20, 20))
    return im


def encode_jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class SynthSample:
    uid: str
    caption: str
    image: bytes
    width: int
    height: int
    label: str
    scene: Scene
    language: str = "en"
    dup_of: str | None = None
    extra: dict = field(default_factory=dict)


def _uid(seed: int, i: int) -> str:
    return hashlib.blake2b(f"synth/{seed}/{i}".encode(), digest_size=16).hexdigest()


def _sample_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


def _choose_label(u: float, fractions: dict[str, float]) -> str:
    acc = 0.0
    for name in DEFECTS:
        acc += fractions.get(name, 0.0)
        if u < acc:
            return name
    return "clean"


def _clean_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(224, 321)), int(rng.integers(224, 321))


# The sides a one-sided near duplicate loses: one side, or two adjacent ones.
COPY_CUT_SIDES = ("l", "t", "r", "b", "lt", "tr", "rb", "bl")

# Duplicates copy one of the last N clean samples: bounded memory for large pools.
SOURCE_WINDOW = 2000


def make_sample(seed: int, i: int, fractions: dict[str, float], sources: list[SynthSample]) -> SynthSample:
    """Sample ``i`` of the pool; duplicates copy one of ``sources`` (recent clean samples)."""
    rng = _sample_rng(seed, i)
    label = _choose_label(float(rng.random()), fractions)
    if label in ("exact_duplicate", "near_duplicate") and not sources:
        label = "clean"
    scene = random_scene(rng)
    size = _clean_size(rng)
    uid = _uid(seed, i)
    caption = scene.caption(rng)
    lang = "en"
    if label == "tiny_image":
        side = int(rng.integers(40, 120))
        size = (side, int(side * rng.uniform(0.8, 1.25)))
    elif label == "extreme_aspect":
        long, short = int(rng.integers(800, 1200)), int(rng.integers(210, 240))
        size = (long, short) if rng.random() < 0.5 else (short, long)
    img = render(scene, size, rng)
    if label == "text_caption":
        text = SIGN_TEXTS[int(rng.integers(len(SIGN_TEXTS)))]
        img = render_text(img, text, rng)
        caption = text.capitalize() if rng.random() < 0.5 else text.lower()
    elif label == "templated_caption":
        caption = SPAM.format(d5=f"{int(rng.integers(100_000)):05d}")
    if label == "blank_image":
        col = np.array(list(BACKGROUNDS.values())[int(rng.integers(len(BACKGROUNDS)))], dtype=np.int16)
        arr = np.clip(col[None, None, :] + rng.integers(-2, 3, size=(size[1], size[0], 1)), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    elif label == "blurry":
        img = img.filter(ImageFilter.GaussianBlur(radius=min(size) / 28))
    data = encode_jpeg(img)
    if label == "corrupt_image":
        data = data[: len(data) // 3] if rng.random() < 0.5 else rng.bytes(len(data) // 4)
    elif label == "non_english":
        lang = list(FOREIGN)[int(rng.integers(len(FOREIGN)))]
        tmpl, nums, cols, shapes = FOREIGN[lang]
        caption = tmpl.format(n=nums[COUNTS[scene.count]], c=cols[scene.color], s=shapes[scene.shape])
    elif label == "junk_caption":
        tmpl = JUNK[int(rng.integers(len(JUNK)))]
        caption = tmpl.format(d4=f"{int(rng.integers(10000)):04d}", d1=int(rng.integers(1, 10)),
                              d6=f"{int(rng.integers(10**6)):06d}", hex=rng.bytes(6).hex(),
                              word=scene.shape)
    elif label == "mismatch":
        other = random_scene(rng)
        while other.shape == scene.shape or other.color == scene.color:
            other = random_scene(rng)
        caption = other.caption(rng)
    elif label == "exact_duplicate":
        src = sources[int(rng.integers(len(sources)))]
        return SynthSample(uid, src.caption, src.image, src.width, src.height, label, src.scene,
                           dup_of=src.uid)
    elif label == "near_duplicate":
        src = sources[int(rng.integers(len(sources)))]
        c, scale, quality = rng.uniform(0.005, 0.02), rng.uniform(0.8, 0.95), int(rng.integers(70, 85))
        # half the copies are cut at one side or two adjacent ones (a banner or a scan's edge
        # trimmed) instead of all round: drawn after the values above, so a centred copy is as before
        sides = COPY_CUT_SIDES[int(rng.integers(len(COPY_CUT_SIDES)))] if rng.random() < 0.5 else "ltrb"
        cut = rng.uniform(0.02, 0.08) if sides != "ltrb" else c
        with Image.open(io.BytesIO(src.image)) as im0:
            im0 = im0.convert("RGB")
            w0, h0 = im0.size
            dx, dy = int(w0 * cut), int(h0 * cut)
            im0 = im0.crop((dx if "l" in sides else 0, dy if "t" in sides else 0,
                            w0 - dx if "r" in sides else w0, h0 - dy if "b" in sides else h0))
            # Stay above DataComp's 200 px rule: a near duplicate should be caught as a duplicate.
            s = max(scale, 205 / min(im0.size))
            im0 = im0.resize((max(1, int(im0.width * s)), max(1, int(im0.height * s))), Image.BICUBIC)
            data = encode_jpeg(im0, quality=quality)
            size = im0.size
        return SynthSample(uid, src.caption, data, size[0], size[1], label, src.scene, dup_of=src.uid,
                           extra={"cut": sides})
    return SynthSample(uid, caption, data, size[0], size[1], label, scene, language=lang)


def synthesize(out: str | Path, samples: int = 5000, shards: int = 10, seed: int = 0,
               fractions: dict[str, float] | None = None) -> list[Path]:
    """Write ``shards`` WebDataset tars (img2dataset layout) and ``ground_truth.parquet``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fr = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    unknown = set(fr) - set(DEFECTS)
    if unknown:
        raise ValueError(f"unknown defect(s) {sorted(unknown)} (allowed: {', '.join(DEFECTS)})")
    if any(not 0 <= v <= 1 for v in fr.values()):
        raise ValueError(f"defect fractions must lie in [0, 1]: {fr}")
    if sum(fr.values()) > 1:
        raise ValueError("defect fractions sum to more than 1")
    shards = max(1, min(shards, samples)) if samples else 1
    per = -(-samples // shards) if samples else 0
    sources: list[SynthSample] = []
    truth: dict[str, list] = {k: [] for k in ("uid", "shard", "key", "label", "dup_of", "shape", "color",
                                              "count", "position", "language", "caption", "cut")}
    paths = []
    for k in range(shards):
        path = out / f"{k:05d}.tar"
        paths.append(path)
        with wds.TarWriter(str(path)) as sink:
            for i in range(k * per, min(samples, (k + 1) * per)):
                s = make_sample(seed, i, fr, sources)
                if s.label == "clean":
                    sources.append(s)
                    if len(sources) > SOURCE_WINDOW:
                        sources.pop(0)
                key = f"{k:05d}{i - k * per:04d}"
                meta = {"uid": s.uid, "key": key, "caption": s.caption, "status": "success",
                        "url": f"https://synth.invalid/{s.uid}.jpg", "width": s.width, "height": s.height,
                        "original_width": s.width, "original_height": s.height,
                        "sha256": hashlib.sha256(s.image).hexdigest()}
                sink.write({"__key__": key, "jpg": s.image, "txt": s.caption, "json": json.dumps(meta)})
                for col, val in (("uid", s.uid), ("shard", path.stem), ("key", key), ("label", s.label),
                                 ("dup_of", s.dup_of), ("shape", s.scene.shape), ("color", s.scene.color),
                                 ("count", s.scene.count), ("position", s.scene.position),
                                 ("language", s.language), ("caption", s.caption), ("cut", s.extra.get("cut"))):
                    truth[col].append(val)
    schema = pa.schema([("uid", pa.string()), ("shard", pa.string()), ("key", pa.string()),
                        ("label", pa.string()), ("dup_of", pa.string()), ("shape", pa.string()),
                        ("color", pa.string()), ("count", pa.int8()), ("position", pa.string()),
                        ("language", pa.string()), ("caption", pa.string()), ("cut", pa.string())])
    pq.write_table(pa.table(truth, schema=schema), out / "ground_truth.parquet")
    log.info("synthesized %d samples in %d shard(s) under %s", samples, len(paths), out)
    return paths
