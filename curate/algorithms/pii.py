"""Personal data in a caption: where it is and of which kind, and the caption with it replaced.

Candidates are found by patterns and confirmed by the libraries made for each kind: Google's
``phonenumbers`` (a number valid in one of the regions, or in international form),
``python-stdnum`` (IBAN mod-97 and country lengths, the check digits of national ID numbers, Luhn
for payment cards). A span is reported once, under the first kind of ``KINDS`` that claims it.

Kinds: ``email``; ``phone``; ``url_personal`` (a link to a person's page: social-network profiles,
``/~user/``, ``/users/<name>``); ``card`` (13-19 digits, a card network's prefix, Luhn-valid);
``iban``; ``national_id`` (US SSN, India Aadhaar, Brazil CPF, China RIC, Spain DNI/NIE, Italy
codice fiscale, Mexico CURP, South Korea RRN, France NIR, each in its written form and with its
check digits). Person names need a named-entity model and are not found here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

KINDS = ("email", "url_personal", "iban", "card", "national_id", "phone")
TAGS = {"email": "<EMAIL>", "phone": "<PHONE>", "url_personal": "<URL>", "card": "<CARD>", "iban": "<IBAN>",
        "national_id": "<ID>"}
PHONE_REGIONS = ("US", "GB", "IN", "DE", "FR", "BR", "ES", "IT", "CA", "AU")

_IMAGE_TLDS = {"png", "jpg", "jpeg", "gif", "webp", "svg", "bmp", "tif", "tiff", "ico"}
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.([A-Za-z]{2,24})\b")
_PROFILE_HOSTS = (r"(?:www\.|m\.)?(?:facebook\.com|fb\.com|instagram\.com|twitter\.com|x\.com|tiktok\.com|"
                  r"linkedin\.com/in|vk\.com|threads\.net|pinterest\.com|flickr\.com/(?:people|photos)|"
                  r"youtube\.com/(?:@|user/|c/)|github\.com|reddit\.com/(?:u|user))")
_URL_PERSONAL = re.compile(
    r"(?:https?://)?(?:" + _PROFILE_HOSTS + r"/@?[A-Za-z0-9._-]{2,}"
    r"|[A-Za-z0-9.-]+\.[A-Za-z]{2,}/(?:~[A-Za-z0-9._-]+|(?:users?|people|profile|members?)/[A-Za-z0-9._-]+))"
    r"[^\s]*", re.IGNORECASE)
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
# a date (06-08-2018, 05.09.17) or a span of years (1994-2001) is written like a phone number
_NOT_PHONE = re.compile(r"^\d{1,2}[./-]\d{1,2}[./-]\d{2,4}$|(?:19|20)\d\d ?[-/] ?(?:19|20)\d\d")
_PHONE_CUE = re.compile(r"(?:tel|phone|call|mobile|mob|cell|fax|whatsapp|contact|☎|📞)\W{0,3}$", re.IGNORECASE)


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


def _card_network(digits: str) -> bool:
    """The prefix of a card network (Visa, Mastercard, Amex, Discover, JCB, UnionPay, Diners)."""
    two, four = int(digits[:2]), int(digits[:4])
    return (digits[0] == "4" or 51 <= two <= 55 or 2221 <= four <= 2720 or two in (34, 37, 36, 38, 62, 65)
            or digits.startswith("6011") or 3528 <= four <= 3589 or 300 <= int(digits[:3]) <= 305)


@lru_cache(maxsize=1)
def _id_checks() -> tuple[tuple[re.Pattern, object], ...]:
    """(written form, validator) of each national ID number; the form keeps a bare run of digits
    (an order number, a barcode) from being read as an ID."""
    from stdnum.br import cpf
    from stdnum.cn import ric
    from stdnum.es import dni, nie
    from stdnum.fr import nir
    from stdnum.in_ import aadhaar
    from stdnum.it import codicefiscale
    from stdnum.kr import rrn
    from stdnum.mx import curp
    from stdnum.us import ssn

    return (
        (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), ssn),
        (re.compile(r"\b[2-9]\d{3}[ -]\d{4}[ -]\d{4}\b"), aadhaar),
        (re.compile(r"\b\d{3}\.\d{3}\.\d{3}-\d{2}\b"), cpf),
        (re.compile(r"\b\d{17}[\dXx]\b"), ric),
        (re.compile(r"\b\d{8}-?[A-Za-z]\b"), dni),
        (re.compile(r"\b[XYZxyz]-?\d{7}-?[A-Za-z]\b"), nie),
        (re.compile(r"\b[A-Za-z]{6}\d{2}[A-Za-z]\d{2}[A-Za-z]\d{3}[A-Za-z]\b"), codicefiscale),
        (re.compile(r"\b[A-Z]{4}\d{6}[HM][A-Z]{5}[0-9A-Z]\d\b"), curp),
        (re.compile(r"\b\d{6}-\d{7}\b"), rrn),
        (re.compile(r"\b[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}\b"), nir),
    )


def _emails(text: str) -> list[Span]:
    return [Span("email", m.start(), m.end()) for m in _EMAIL.finditer(text)
            if m.group(1).lower() not in _IMAGE_TLDS]


def _personal_urls(text: str) -> list[Span]:
    return [Span("url_personal", m.start(), m.end()) for m in _URL_PERSONAL.finditer(text)]


def _ibans(text: str) -> list[Span]:
    from stdnum import iban

    return [Span("iban", m.start(), m.end()) for m in _IBAN.finditer(text) if iban.is_valid(m.group())]


def _cards(text: str) -> list[Span]:
    from stdnum import luhn

    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _card_network(digits) and luhn.is_valid(digits):
            out.append(Span("card", m.start(), m.end()))
    return out


def _national_ids(text: str) -> list[Span]:
    return [Span("national_id", m.start(), m.end()) for pattern, check in _id_checks()
            for m in pattern.finditer(text) if check.is_valid(m.group())]  # type: ignore[attr-defined]


def _phones(text: str, regions: tuple[str, ...]) -> list[Span]:
    import phonenumbers

    out = []
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            raw = m.raw_string
            # a bare run of digits is an order number or a barcode unless the text says it is a phone
            if _NOT_PHONE.search(raw):
                continue
            formatted = (raw.startswith("+") or re.match(r"\(\d{2,5}\)\s?\d", raw)
                         or (len(re.findall(r"[\s.-]+", raw.strip())) >= 2 and sum(c.isdigit() for c in raw) >= 8))
            if formatted or _PHONE_CUE.search(text[max(0, m.start - 20):m.start]):
                out.append(Span("phone", m.start, m.end))
    return out


def find_pii(text: str | None, kinds: tuple[str, ...] = KINDS,
             phone_regions: tuple[str, ...] = PHONE_REGIONS) -> list[Span]:
    """Every personal-data span of ``kinds`` in ``text``, in text order, none overlapping another
    (where two kinds claim the same characters, the earlier kind of ``KINDS`` keeps them)."""
    if not text:
        return []
    digits = sum(c.isdigit() for c in text)
    finders = {"email": lambda: _emails(text) if "@" in text else [],
               "url_personal": lambda: _personal_urls(text) if "/" in text or "." in text else [],
               "iban": lambda: _ibans(text) if digits >= 10 else [],
               "card": lambda: _cards(text) if digits >= 13 else [],
               "national_id": lambda: _national_ids(text) if digits >= 6 else [],
               "phone": lambda: _phones(text, phone_regions) if digits >= 7 else []}
    taken: list[Span] = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        for s in sorted(set(finders[kind]()), key=lambda s: (s.start, -s.end)):
            if all(s.end <= t.start or s.start >= t.end for t in taken):
                taken.append(s)
    return sorted(taken, key=lambda s: s.start)


def redact(text: str, spans: list[Span] | list[dict]) -> str:
    """``text`` with each span replaced by its kind's tag (``<EMAIL>``, ``<PHONE>``...)."""
    parts, at = [], 0
    for s in sorted((x if isinstance(x, Span) else Span(**x) for x in spans), key=lambda s: s.start):
        parts += [text[at:s.start], TAGS[s.kind]]
        at = s.end
    return "".join(parts) + text[at:]
