"""Personal data in free text, Chinese as well as English: finding it and masking or pseudonymizing it.

What is found, wherever it stands (Chinese has no spaces, so nothing may depend on word boundaries; only digits
and Latin letters glued to a number change what it is):

* e-mail addresses (ASCII), also glued to CJK text;
* phone numbers of the declared regions (default CN and US), and of any country when written with ``+``,
  by Google's ``phonenumbers`` (``PhoneNumberMatcher``, STRICT_GROUPING leniency: valid per the numbering plan and
  grouped the way that country groups its numbers);
* mainland resident ID numbers (18 digits with the GB 11643 / ISO 7064 MOD 11-2 check character, or the old 15-digit
  form), with a valid region and birth date; US social security numbers in their dashed form;
* bank-card numbers: 16-19 digits (with or without space or dash groups) with an issuer prefix and a valid Luhn check.

Check digits decide where they exist, so order numbers, dates, prices and quantities stay as they are; where a check
is weak, the words before a number ("订单号", "order #") can say it is an order, tracking or invoice number. Full-width
characters (１３８…, ＠) are read as their ASCII forms, but the span replaced is the one written.

Cost: a text without ``@`` and without a cluster of 7 or more digits costs two regular-expression scans. The phone
matcher is pure Python (50-200 us per call), so it only sees a short window around a cluster whose digits could be a
number of a declared region by that region's own metadata (one regular expression), never IPv4 addresses, dates or
codes like "INV-2022-781853"; numbers written as one run of digits are checked with VALID, which decides the same as
STRICT_GROUPING for them and skips formatting. The tests check that these shortcuts lose nothing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher, PhoneNumberType

from services.mesh.errors import InvalidArgument

__all__ = [
    "PiiKind",
    "MaskingMode",
    "MaskingSpec",
    "PiiSpan",
    "PiiScanner",
    "PiiMasker",
    "Pseudonymizer",
    "DEFAULT_PHONE_REGIONS",
    "MAX_PHONE_REGIONS",
    "TOKEN_HEX_DIGITS",
    "masking_spec",
]

#: Phone regions used when the uploader declares none: a Chinese and English tenant.
DEFAULT_PHONE_REGIONS = ("CN", "US")
#: Each region costs one matcher pass over every candidate, so their number is bounded.
MAX_PHONE_REGIONS = 8
#: Hex digits of a pseudonym: 80 bits, so 10^9 distinct values of one kind collide with probability < 10^-6.
TOKEN_HEX_DIGITS = 20
_LENIENCY = Leniency.STRICT_GROUPING


class PiiKind(enum.Enum):
    """Kinds of personal data; the value is the tag written in their place (``[PHONE]``, ``[PHONE:3f9a…]``)."""

    EMAIL = "EMAIL"
    PHONE = "PHONE"
    ID_NUMBER = "ID"  # national identity numbers: mainland resident ID, US SSN
    BANK_CARD = "CARD"


class MaskingMode(enum.Enum):
    """What replaces a span: its kind's placeholder, or a keyed pseudonym (same value, same token in a tenant)."""

    PLACEHOLDER = "placeholder"
    PSEUDONYMIZE = "pseudonymize"


@dataclass(frozen=True)
class MaskingSpec:
    """What to mask and how."""

    kinds: frozenset[PiiKind] = frozenset(PiiKind)
    mode: MaskingMode = MaskingMode.PLACEHOLDER
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS


def masking_spec(
    kinds: frozenset[PiiKind] = frozenset(),
    mode: MaskingMode = MaskingMode.PLACEHOLDER,
    phone_regions: tuple[str, ...] | list[str] = (),
) -> MaskingSpec:
    """A checked MaskingSpec: no kinds means all, no regions the defaults; unknown regions are InvalidArgument."""
    regions: list[str] = []
    for region in phone_regions:
        code = region.strip().upper()
        if code not in phonenumbers.SUPPORTED_REGIONS:
            raise InvalidArgument(f"unknown phone region {region!r}: use ISO 3166-1 alpha-2 codes such as CN, US, GB")
        if code not in regions:
            regions.append(code)
    if len(regions) > MAX_PHONE_REGIONS:
        raise InvalidArgument(f"at most {MAX_PHONE_REGIONS} phone regions")
    return MaskingSpec(kinds or frozenset(PiiKind), mode, tuple(regions) or DEFAULT_PHONE_REGIONS)


@dataclass(frozen=True, slots=True)
class PiiSpan:
    """One identifier found: ``text[start:end]``, and its canonical value (what a pseudonym is computed from:
    lower-case e-mail, E.164 phone, 18-character resident ID, digits of an SSN or card)."""

    kind: PiiKind
    start: int
    end: int
    canonical: str


# -- normalization -----------------------------------------------------------------------------------------

# Full-width ASCII (U+FF01-FF5E) and the ideographic space map one code point to one, so offsets stay valid.
_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_HAS_FULL_WIDTH = re.compile("[\uff01-\uff5e\u3000]")

# A cluster of at least 7 digits held together by phone punctuation: the only places a phone, ID or card number can
# be; also the cheap test of whether a text needs a closer look at all. A leading "+", "(" or "[" is looked up apart.
# A full stop before white space ends a sentence, and a cluster: "call 212.555.0199. 2024/3/15 works" holds two.
_SEPARATORS = " \\-/()\\[\\]~\u00a0\u2009\u202f\u2010-\u2015\u2212"
_CLUSTER = re.compile(f"[0-9](?:(?:[{_SEPARATORS}]|\\.(?!\\s)){{0,4}}[0-9]){{6,}}")
_LEAD = re.compile(r"[+(\[]{1,3}$")
# What may follow a number and still belong to it (an extension), or tell the matcher it is a time of day.
_SUFFIX = re.compile(r":[0-5][0-9]|[ ]?(?:ext\.?|extn\.?|x|#|~)[ ]?[0-9]{1,7}", re.IGNORECASE)
_DIGITS_ONLY = re.compile(r"[^0-9]")
_DIGIT_RUN = re.compile(r"[0-9]+")
#: Most digits a phone number is written with: 15 (E.164) after an international prefix such as 011.
_MAX_PHONE_DIGITS = 18

# -- the patterns -----------------------------------------------------------------------------------------

# ASCII e-mail addresses; only ASCII address characters bound them, so CJK text may touch them on either side.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9_%+-][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
# A number stands alone when no digit touches it, not even across a dash ("231312-131910863147909" is one order
# number, not a date and an ID).
_ALONE = r"(?<![0-9])(?<![0-9]-)", r"(?![0-9])(?!-[0-9])"
# Resident ID: 6-digit region, 8-digit birth date, 3-digit sequence, check character; optionally grouped 6-8-4.
_RESIDENT_ID = re.compile(_ALONE[0] + r"([1-9][0-9]{5})([ -]?)((?:18|19|20)[0-9]{6})\2([0-9]{3}[0-9Xx])" + _ALONE[1])
# The 15-digit form (issued until 1999): region, YYMMDD of a 19xx birth date, sequence; no check character.
_OLD_RESIDENT_ID = re.compile(_ALONE[0] + r"([1-9][0-9]{5})([0-9]{6})([0-9]{3})" + _ALONE[1])
_SSN = re.compile(r"(?<![0-9-])([0-9]{3})-([0-9]{2})-([0-9]{4})(?![0-9-])")
# 16-19 digits, either contiguous or in groups of four separated by one space or dash throughout (the last group
# of a 17-19-digit card holds the remaining 1-3 digits, as printed).
_CARD = re.compile(
    _ALONE[0] + r"(?:[0-9]{16,19}|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{4}(?:\1[0-9]{1,3})?)" + _ALONE[1]
)
# Where the weak checks (Luhn passes one random number in ten; an old 15-digit ID has no check character; a phone
# number is just digits) cannot tell, the words just before a number can: right after "订单号", "快递单号",
# "order #", "tracking number", "invoice no." comes an order, tracking or invoice number, not a card, ID or phone.
_BUSINESS_NUMBER_BEFORE = re.compile(
    r"(?:订单|单号|运单|发票|流水|交易|(?<![A-Za-z])(?:order|tracking|invoice|transaction|txn|ref(?:erence)?)s?)"
    r"(?:[ ]?(?:号码|号|编号|no\.?|number|id|#|:|：|-))*[ ]*$",
    re.IGNORECASE,
)
_CONTEXT_CHARS = 24

_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82 83".split()
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def _valid_birth_date(year: int, month: int, day: int) -> bool:
    try:
        born = date(year, month, day)
    except ValueError:
        return False
    return date(1900, 1, 1) <= born <= date.today()


def _id_check_character(first17: str) -> str:
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def _resident_id(match: re.Match[str]) -> str | None:
    """The ID's canonical 18 characters if region, birth date and check character are valid."""
    region, _, born, tail = match.groups()
    if region[:2] not in _PROVINCES or not _valid_birth_date(int(born[:4]), int(born[4:6]), int(born[6:])):
        return None
    body = region + born + tail[:3]
    check = tail[3].upper()
    return body + check if _id_check_character(body) == check else None


def _old_resident_id(match: re.Match[str]) -> str | None:
    """A 15-digit ID as the 18-character ID it became (century inserted, check character computed), so both forms
    of one person's number give the same pseudonym."""
    region, born, sequence = match.groups()
    if region[:2] not in _PROVINCES or not _valid_birth_date(1900 + int(born[:2]), int(born[2:4]), int(born[4:])):
        return None
    body = region + "19" + born + sequence
    return body + _id_check_character(body)


def _ssn(match: re.Match[str]) -> str | None:
    area, group, serial = match.groups()
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return area + group + serial


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_issuer(digits: str) -> bool:
    """An issuer identification number of a payment network, with a length that network issues: Visa 4 (16, 19),
    Mastercard 51-55 and 2221-2720 (16); 16-19 for JCB 3528-3589, Diners 30/36/38/39, Discover and RuPay
    60/64/65, UnionPay 62 and 81, Maestro 50/56-58/63/67 and China's domestic 95 range."""
    length = len(digits)
    two = int(digits[:2])
    four = int(digits[:4])
    if digits[0] == "4":
        return length in (16, 19)
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return length == 16
    return 3528 <= four <= 3589 or two in (30, 36, 38, 39, 50, 56, 57, 58, 60, 62, 63, 64, 65, 67, 81, 95)


def _looks_like_resident_id(digits: str) -> bool:
    """18 digits with a resident ID's region and birth date: a mistyped ID number rather than a card."""
    return (
        len(digits) == 18
        and digits[:2] in _PROVINCES
        and _valid_birth_date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    )


def _card(match: re.Match[str]) -> str | None:
    if match.string[match.end() : match.end() + 1] in ("X", "x"):
        return None  # 17 digits and an X: a resident ID (with a wrong check character), not a card
    digits = _DIGITS_ONLY.sub("", match.group(0))
    if not _card_issuer(digits) or _looks_like_resident_id(digits):
        return None
    return digits if _luhn(digits) else None


# -- the scanner ------------------------------------------------------------------------------------------


_Validator = Callable[["re.Match[str]"], "str | None"]
#: Number detectors in order of precedence (a span one of them claimed is not looked at again), each with the
#: fewest digits its numbers have, its validator (the canonical value, or None) and whether its check is weak
#: enough for the words before to overrule.
_NUMBER_DETECTORS: tuple[tuple[PiiKind, int, re.Pattern[str], _Validator, bool], ...] = (
    (PiiKind.ID_NUMBER, 17, _RESIDENT_ID, _resident_id, False),
    (PiiKind.ID_NUMBER, 15, _OLD_RESIDENT_ID, _old_resident_id, True),
    (PiiKind.ID_NUMBER, 9, _SSN, _ssn, True),
    (PiiKind.BANK_CARD, 16, _CARD, _card, True),
)


def _business_number(text: str, start: int) -> bool:
    return _BUSINESS_NUMBER_BEFORE.search(text, max(0, start - _CONTEXT_CHARS), start) is not None


def _after_code(text: str, start: int) -> bool:
    """Digits right after letters and a hyphen belong to a code ("INV-2022-781853", "SKU-…"), not a phone number
    (which the matcher would only refuse after parsing the digits, for each region)."""
    return start >= 2 and text[start - 1] == "-" and text[start - 2].isascii() and text[start - 2].isalpha()


class PiiScanner:
    """Finds the identifiers of ``kinds`` in texts."""

    def __init__(self, kinds: frozenset[PiiKind], phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS) -> None:
        self._email = PiiKind.EMAIL in kinds
        self._numbers = [d for d in _NUMBER_DETECTORS if d[0] in kinds]
        self._phone_regions = phone_regions if PiiKind.PHONE in kinds else ()
        self._phone_plans = [_PhonePlan.of(region) for region in self._phone_regions]
        lengths = [length for plan in self._phone_plans for length in plan.lengths]
        self._shortest_phone = min(lengths, default=1)
        self._any_region = re.compile("|".join(f"(?:{plan.pattern})" for plan in self._phone_plans) or "(?!)")

    def find(self, text: str) -> list[PiiSpan]:
        """The identifiers in ``text``, in order, none overlapping (e-mail before ID before card before phone)."""
        if _HAS_FULL_WIDTH.search(text):
            text = text.translate(_FULL_WIDTH)
        email = self._email and "@" in text
        clusters = list(_CLUSTER.finditer(text)) if self._numbers or self._phone_regions else []
        if not email and not clusters:
            return []
        found: list[PiiSpan] = []
        claimed: list[tuple[int, int]] = []  # found spans, and numbers found to be order or invoice numbers

        def free(start: int, end: int) -> bool:
            return not any(s < end and start < e for s, e in claimed)

        if email:
            for match in _EMAIL.finditer(text):
                found.append(PiiSpan(PiiKind.EMAIL, match.start(), match.end(), match.group(0).lower()))
                claimed.append(match.span())
        # Numbers are looked for only inside the clusters (one character around them for the lookarounds, and an
        # ID's trailing X), and only by detectors whose numbers fit.
        sized = [(cluster, _digit_count(cluster.group(0))) for cluster in clusters]
        for kind, fewest, pattern, validate, weak in self._numbers:
            for cluster, digits in sized:
                if digits < fewest:
                    continue
                for match in pattern.finditer(text, max(0, cluster.start() - 1), cluster.end() + 1):
                    start, end = match.span()
                    if not free(start, end):
                        continue
                    value = validate(match)
                    if value is None:
                        continue
                    claimed.append((start, end))
                    if not (weak and _business_number(text, start)):
                        found.append(PiiSpan(kind, start, end, value))
        for cluster, _ in sized if self._phone_regions else ():
            start, end = cluster.span()
            code = _after_code(text, start) and " " not in cluster.group(0)
            if code or any(s <= start and end <= e for s, e in claimed):
                continue
            for span in self._phones(text, cluster):
                if free(span.start, span.end) and not _after_code(text, span.start):
                    claimed.append((span.start, span.end))
                    if not _business_number(text, span.start):
                        found.append(span)
        found.sort(key=lambda span: span.start)
        return found

    def _phones(self, text: str, cluster: re.Match[str]) -> list[PiiSpan]:
        """Phone numbers in one digit cluster, longest first: the matcher of each declared region over a window
        holding the cluster, the character before it (a Latin letter there means it is not a phone number), a
        leading ``+``/``(`` and a trailing extension or ``:mm``. The first region whose matches cover every digit of
        the cluster decides; otherwise all regions' matches compete, the longest first, earlier regions on ties."""
        start, end = cluster.span()
        lead = _LEAD.search(text, max(0, start - 3), start)
        if lead is not None:
            start = lead.start()
        international = lead is not None and "+" in lead.group(0)
        written = cluster.group(0)
        one_run = written.isdigit()
        if not international and not one_run and _NOT_A_PHONE.fullmatch(written):
            return []
        sequences = [written] if one_run else _digit_sequences(written, self._shortest_phone)
        if not international and not any(self._any_region.fullmatch(digits) for digits in sequences):
            return []  # the common case, decided by one regular expression per digit sequence
        plans = [
            (order, plan)
            for order, plan in enumerate(self._phone_plans)
            if (international and order == 0) or any(plan.possible(digits) for digits in sequences)
        ]
        suffix = _SUFFIX.match(text, end)
        window_start = max(0, start - 1)
        window = text[window_start : (suffix.end() if suffix else end) + 1]
        wanted = _digit_count(cluster.group(0))
        leniency = _leniency_for(cluster.group(0), suffix)
        candidates: list[tuple[int, int, PiiSpan]] = []  # (-length, region order, span)
        for order, plan in plans:
            covered = 0
            for match in PhoneNumberMatcher(window, plan.region, leniency=leniency):
                if not _written_as_dialled(plan.region, match.raw_string, match.number):
                    continue
                e164 = phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164)
                span = PiiSpan(PiiKind.PHONE, window_start + match.start, window_start + match.end, e164)
                candidates.append((match.start - match.end, order, span))
                covered += _digit_count(match.raw_string)
            if covered >= wanted:
                break
        candidates.sort(key=lambda c: (c[0], c[1]))
        return [span for _, _, span in candidates]


def _leniency_for(cluster: str, suffix: re.Match[str] | None) -> int:
    """STRICT_GROUPING checks that a number's digit groups are the ones its country writes; a number written as one
    run of digits has no groups to check, so VALID (which skips formatting the number, a third of the matcher's
    time) decides the same for it."""
    return Leniency.VALID if suffix is None and cluster.isdigit() else _LENIENCY


#: Regions whose landline numbers are written with their trunk prefix (0) or country code whenever the area code
#: is: a mainland landline without either ("1031943830", "2125550199", or after a carrier-selection code that
#: phonenumbers strips, "110105381321510") is an order number, a timestamp or a US number, not a Chinese phone.
_TRUNK_WRITTEN = {"CN": "0"}
_FIXED_LINE = (PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE)


def _written_as_dialled(region: str, raw: str, number: phonenumbers.PhoneNumber) -> bool:
    trunk = _TRUNK_WRITTEN.get(region)
    if trunk is None or raw.lstrip("([").startswith("+"):
        return True
    national = str(number.national_number)
    written = _DIGITS_ONLY.sub("", raw)
    prefix = written[: len(written) - len(national)] if written.endswith(national) else None
    if prefix == trunk or prefix == "00" + str(number.country_code):
        return True
    if prefix in ("", str(number.country_code)) and len(national) == 11 and national[0] == "1":
        return True  # a mainland mobile number: written without a prefix, or after a bare 86
    return phonenumbers.number_type(number) not in _FIXED_LINE


_NOT_FIXED_LINE_TYPES = (
    "mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "voip",
    "pager",
    "uan",
    "voicemail",
)


class _PhonePlan:
    """The prefilter of one region, from phonenumbers' own metadata: could these digits be a number of the region,
    written nationally (after its national prefix or country code, or neither) or after an international prefix?
    One regular expression: any number the matcher (and ``_written_as_dialled``) would accept passes; most dates,
    order numbers and amounts do not, and never reach the matcher."""

    _plans: dict[str, _PhonePlan] = {}

    def __init__(self, region: str) -> None:
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        assert metadata is not None and metadata.general_desc is not None
        self.region = region
        general = metadata.general_desc.national_number_pattern or "(?!)"
        prefixes = [str(metadata.country_code)]
        if national_prefix := metadata.national_prefix_for_parsing or metadata.national_prefix:
            prefixes.append(national_prefix)
        prefix = "|".join(f"(?:{p})" for p in prefixes)
        trunk = _TRUNK_WRITTEN.get(region)
        if trunk is None:
            national = f"(?:{prefix})?(?:{general})"
        else:  # without the trunk prefix, only numbers that are not landlines (see _written_as_dialled)
            types = [getattr(metadata, name) for name in _NOT_FIXED_LINE_TYPES]
            not_fixed = "|".join(f"(?:{d.national_number_pattern})" for d in types if d and d.national_number_pattern)
            national = f"{trunk}(?:{general})|(?:{prefix})?(?:{not_fixed or '(?!)'})"
        abroad = f"(?:{metadata.international_prefix})(?!0)[0-9]{{7,15}}|" if metadata.international_prefix else ""
        self.lengths = metadata.general_desc.possible_length or (1,)
        self.pattern = abroad + national
        self._possible = re.compile(self.pattern)

    @classmethod
    def of(cls, region: str) -> _PhonePlan:
        plan = cls._plans.get(region)
        if plan is None:
            plan = cls._plans[region] = _PhonePlan(region)
        return plan

    def possible(self, digits: str) -> bool:
        return self._possible.fullmatch(digits) is not None


# Clusters that are certainly something else; the matcher would refuse them too, only more slowly.
_NOT_A_PHONE = re.compile(
    r"(?:[0-9]{1,3}\.){3}[0-9]{1,3}"  # an IPv4 address
    r"|(?:19|20)[0-9]{2}([-./])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12][0-9]|3[01])"  # a date, year first
    r"|(?:0?[1-9]|[12][0-9]|3[01])([-./])(?:0?[1-9]|1[0-2])\2(?:19|20)[0-9]{2}"  # a date, year last
)


def _digit_sequences(cluster: str, shortest: int) -> list[str]:
    """The digits of every stretch of consecutive digit runs in a cluster that is as long as the ``shortest`` number
    of the declared regions: the only digits a phone match can hold (the matcher never splits a run of digits)."""
    runs = _DIGIT_RUN.findall(cluster)
    sequences = []
    for i in range(len(runs)):
        digits = ""
        for run in runs[i:]:
            digits += run
            if len(digits) > _MAX_PHONE_DIGITS:
                break
            if len(digits) >= shortest:
                sequences.append(digits)
    return sequences


def _digit_count(text: str) -> int:
    return len(_DIGITS_ONLY.sub("", text))


# -- replacing --------------------------------------------------------------------------------------------


class Pseudonymizer:
    """Keyed pseudonyms: HMAC-SHA256 under a tenant's pseudonym key of (kind, canonical value), truncated to
    ``TOKEN_HEX_DIGITS`` hex digits. Without the key a token reveals nothing, not even by trying every phone
    number (the key has 256 bits); the same value gives the same token everywhere in the tenant."""

    def __init__(self, key: bytes, key_id: str) -> None:
        if len(key) < 32:
            raise ValueError("a pseudonym key has at least 256 bits")
        self._key = key
        self.key_id = key_id

    def token(self, kind: PiiKind, canonical: str) -> str:
        message = kind.name.encode() + b"\x00" + canonical.encode()
        return hmac.digest(self._key, message, hashlib.sha256).hex()[:TOKEN_HEX_DIGITS]


class PiiMasker:
    """Replaces the identifiers a MaskingSpec asks for by placeholders (``[PHONE]``) or pseudonyms
    (``[PHONE:3f9a…]``); counts what it replaced."""

    def __init__(self, spec: MaskingSpec, pseudonymizer: Pseudonymizer | None = None) -> None:
        if spec.mode is MaskingMode.PSEUDONYMIZE and pseudonymizer is None:
            raise ValueError("pseudonymization needs the tenant's pseudonym key")
        self.spec = spec
        self._scanner = PiiScanner(spec.kinds, spec.phone_regions)
        self._pseudonyms = pseudonymizer if spec.mode is MaskingMode.PSEUDONYMIZE else None

    def mask(self, text: str) -> tuple[str, dict[PiiKind, int]]:
        """``text`` with its identifiers replaced, and how many of each kind; ``text`` itself when none."""
        spans = self._scanner.find(text)
        if not spans:
            return text, {}
        counts: dict[PiiKind, int] = {}
        pieces: list[str] = []
        position = 0
        for span in spans:
            pieces.append(text[position : span.start])
            if self._pseudonyms is None:
                pieces.append(f"[{span.kind.value}]")
            else:
                pieces.append(f"[{span.kind.value}:{self._pseudonyms.token(span.kind, span.canonical)}]")
            position = span.end
            counts[span.kind] = counts.get(span.kind, 0) + 1
        pieces.append(text[position:])
        return "".join(pieces), counts
