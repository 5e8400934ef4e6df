"""A labelled evaluation set for personal-data masking, generated from a seed: Chinese, English and mixed customer
messages holding phone numbers, resident IDs, SSNs, bank cards and e-mail addresses (valid ones labelled; ones with
wrong check digits or lengths not), at the start, middle and end of sentences, glued to CJK text, with separators
and in full-width digits, beside clean text full of order numbers, dates, prices and quantities.

The check digits here are computed independently of services.storage.core.pii, so the two check each other.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LabelledRow", "evaluation_set", "clean_sentence"]

#: Kind names as services.storage.core.pii.PiiKind names them.
EMAIL, PHONE, ID, CARD = "EMAIL", "PHONE", "ID_NUMBER", "BANK_CARD"


@dataclass(frozen=True)
class LabelledRow:
    text: str
    language: str  # zh, en, mixed
    spans: tuple[tuple[str, int, int], ...]  # (kind, start, end) of every identifier that must be masked
    numbers: tuple[tuple[str, int, int], ...]  # (context, start, end) of every number that must stay


_FULL_WIDTH = {ord(c): ord(c) + 0xFEE0 for c in "0123456789+-()@."} | {ord(" "): 0x3000}

_CN_MOBILE = [f"13{d}" for d in range(10)] + ["150", "151", "152", "153", "155", "156", "157", "158", "159"]
_CN_MOBILE += [f"18{d}" for d in range(10)] + ["166", "173", "176", "177", "178", "191", "198", "199"]
_CN_AREAS = ["010", "020", "021", "022", "023", "024", "025", "027", "028", "029", "0755", "0571", "0512", "0532"]
_SG_PREFIXES = ["61", "62", "63", "81", "82", "90", "91", "96"]  # Singapore landlines and mobiles
_US_AREAS = "201 202 206 212 213 214 215 305 310 312 404 415 469 503 512 602 617 646 702 713 718 805 917 972".split()
_ID_REGIONS = "110101 110105 310104 440305 330106 510107 420111 320102 610113 500103 370202 620102".split()
_ID_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]
_EMAIL_LOCAL = (
    "zhang.wei li_na88 wangfang1990 john.smith j.doe+news chen-jie 13800138000 947281635 m.garcia xiaoming".split()
)
_EMAIL_DOMAIN = (
    "qq.com 163.com 126.com gmail.com outlook.com example.com.cn company.cn foxmail.com mail.tsinghua.edu.cn"
)


class _Generator:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def digits(self, n: int, first: str = "0123456789") -> str:
        return self.r.choice(first) + "".join(self.r.choice("0123456789") for _ in range(n - 1))

    def maybe_full_width(self, text: str) -> str:
        return text.translate(_FULL_WIDTH) if self.r.random() < 0.1 else text

    # -- identifiers that must be masked ----------------------------------------------------------------------

    def cn_mobile(self) -> str:
        number = self.r.choice(_CN_MOBILE) + self.digits(8)
        a, b, c = number[:3], number[3:7], number[7:]
        return self.r.choice(
            [number, number, f"{a} {b} {c}", f"{a}-{b}-{c}", f"+86 {a} {b} {c}", f"+86{number}", f"(+86){number}"]
        )

    def cn_landline(self) -> str:
        area = self.r.choice(_CN_AREAS)
        local = self.digits(8, "234567")
        return self.r.choice([f"{area}-{local}", f"{area}-{local[:4]} {local[4:]}", f"+86 {area[1:]} {local}"])

    def us_phone(self) -> str:
        area = self.r.choice(_US_AREAS)
        exchange = self.digits(3, "23456789")
        while exchange[1:] == "11" or exchange == "555":
            exchange = self.digits(3, "23456789")
        line = self.digits(4)
        return self.r.choice(
            [
                f"({area}) {exchange}-{line}",
                f"{area}-{exchange}-{line}",
                f"{area}.{exchange}.{line}",
                f"+1 {area} {exchange} {line}",
                f"+1-{area}-{exchange}-{line}",
                f"1-{area}-{exchange}-{line}",
            ]
        )

    def intl_phone(self) -> str:
        return self.r.choice(
            [
                f"+44 20 7{self.digits(3)} {self.digits(4)}",
                f"+81 3-{self.digits(4, '3456')}-{self.digits(4)}",
                f"+65 {self.r.choice(_SG_PREFIXES)}{self.digits(2)} {self.digits(4)}",
            ]
        )

    def phone(self) -> str:
        pick = self.r.random()
        if pick < 0.5:
            return self.cn_mobile()
        if pick < 0.65:
            return self.cn_landline()
        if pick < 0.9:
            return self.us_phone()
        return self.intl_phone()

    def birth(self, low: int, high: int) -> str:
        return f"{self.r.randint(low, high)}{self.r.randint(1, 12):02d}{self.r.randint(1, 28):02d}"

    def resident_id(self, valid: bool = True) -> str:
        if self.r.random() < 0.2:  # the old 15-digit form: no check character, a 19xx birth date
            born = self.birth(1930, 1984)[2:] if valid else f"{self.r.randint(30, 84)}13{self.r.randint(1, 28):02d}"
            return self.r.choice(_ID_REGIONS) + born + self.digits(3)
        body = self.r.choice(_ID_REGIONS) + self.birth(1950, 2005) + self.digits(3)
        check = "10X98765432"[sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True)) % 11]
        if not valid:
            check = self.r.choice([c for c in "0123456789X" if c != check])
        if check == "X" and self.r.random() < 0.3:
            check = "x"
        number = body + check
        if self.r.random() < 0.15:
            sep = self.r.choice(" -")
            number = f"{number[:6]}{sep}{number[6:14]}{sep}{number[14:]}"
        return number

    def ssn(self) -> str:
        area = self.r.choice([n for n in range(1, 900) if n != 666])
        return f"{area:03d}-{self.r.randint(1, 99):02d}-{self.r.randint(1, 9999):04d}"

    def card(self, valid: bool = True) -> str:
        prefix, length = self.r.choice(
            [("4", 16), ("62", 16), ("62", 19), ("5" + self.digits(1, "12345"), 16), ("2221", 16), ("3530", 16)]
        )
        body = prefix + self.digits(length - len(prefix) - 1)
        total = 0
        for i, ch in enumerate(reversed(body)):
            d = int(ch) * (2 if i % 2 == 0 else 1)
            total += d - 9 if d > 9 else d
        check = (10 - total % 10) % 10
        if not valid:
            check = (check + self.r.randint(1, 9)) % 10
        number = body + str(check)
        if self.r.random() < 0.4:
            sep = self.r.choice(" -")
            number = sep.join(number[i : i + 4] for i in range(0, len(number), 4))
        return number

    def email(self) -> str:
        return f"{self.r.choice(_EMAIL_LOCAL)}@{self.r.choice(_EMAIL_DOMAIN.split())}"

    # -- numbers that must stay -------------------------------------------------------------------------------

    def order(self) -> str:
        return self.r.choice(
            [
                self.digits(self.r.choice([18, 19]), "1234"),  # Taobao / Tmall
                self.digits(12, "23456789"),  # JD
                f"{self.digits(3, '1')}-{self.digits(7)}-{self.digits(7)}",  # Amazon
                f"{self.r.randint(2301, 2412)}{self.r.randint(1, 28):02d}-{self.digits(15)}",  # Pinduoduo
            ]
        )

    def date(self) -> str:
        y, m, d = self.r.randint(2015, 2025), self.r.randint(1, 12), self.r.randint(1, 28)
        return self.r.choice(
            [f"{y}-{m:02d}-{d:02d}", f"{y}/{m}/{d}", f"{y}年{m}月{d}日", f"{y}{m:02d}{d:02d}", f"{d:02d}.{m:02d}.{y}"]
        )

    def time(self) -> str:
        return f"{self.r.randint(0, 23):02d}:{self.r.randint(0, 59):02d}" + self.r.choice(
            ["", f":{self.digits(2, '012345')}"]
        )

    def price(self) -> str:
        return self.r.choice(
            [
                f"¥{self.r.randint(1, 99)},{self.digits(3)}.{self.digits(2)}",
                f"${self.r.randint(1, 999)}.{self.digits(2)}",
                f"{self.r.randint(10, 99999)}元",
                f"€{self.r.randint(1, 500)}.{self.digits(2)}",
            ]
        )

    def negative(self) -> tuple[str, str]:
        """A number that must stay, and the context it appears in: order, tracking and invoice numbers, dates,
        times, prices and other numbers in their usual places, and identifiers with a wrong check digit, length or
        range in the places where real ones stand."""
        r = self.r
        makers: list[tuple[str, Callable[[], str]]] = [
            ("order", self.order),
            ("order", self.order),
            ("tracking", lambda: r.choice([f"SF{self.digits(12)}", self.digits(12, "7"), self.digits(13, "9")])),
            ("invoice", lambda: r.choice([f"INV-{r.randint(2019, 2025)}-{self.digits(6)}", self.digits(20, "2")])),
            ("date", self.date),
            ("time", self.time),
            ("price", self.price),
            ("misc", lambda: f"{r.randint(1, 500)}"),
            ("misc", lambda: r.choice(["17", "16", "15"]) + self.digits(8)),  # unix time
            ("misc", lambda: ".".join(str(r.randint(1, 254)) for _ in range(4))),
            ("misc", lambda: f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}"),
            ("misc", lambda: self.digits(6, "123456789")),  # postal code
            (PHONE, lambda: r.choice(_CN_MOBILE) + self.digits(r.choice([7, 9]))),  # one digit short or long
            (ID, lambda: self.resident_id(valid=False)),  # wrong check character, or month 13 in the old form
            (ID, lambda: f"{r.choice(['000', '666', '900'])}-{self.digits(2)}-{self.digits(4)}"),  # impossible SSN
            (CARD, lambda: self.card(valid=False)),  # fails the Luhn check
        ]
        context, make = r.choice(makers)
        return self.maybe_full_width(make()), context


_ZH = {
    PHONE: [
        "我的手机号是{}，请尽快联系我",
        "{}是我的电话",
        "请拨打{}",
        "电话{}找王经理",
        "联系方式：{}",
        "有问题打{}或者留言",
    ],
    ID: ["身份证号{}，请核实", "{}是我的身份证号码", "我的身份证{}", "证件号码：{}已提交"],
    CARD: ["退款请打到卡号{}", "{}这张卡被扣了两次", "银行卡{}无法支付", "卡号是{}"],
    EMAIL: ["邮箱{}", "请发到{}谢谢", "{}是我的邮箱", "发票寄到{}吧"],
}
_EN = {
    PHONE: ["call me at {} tomorrow", "{} is my number", "my cell is {}", "reach me on {}.", "Phone: {}"],
    ID: ["my SSN is {}", "{} is the SSN on file", "Chinese ID {} was rejected"],
    CARD: ["my card {} was charged twice", "{} got declined", "refund to card number {}"],
    EMAIL: ["email me at {}", "{} is my address", "contact {}.", "send it to {} please"],
}
_MIXED = {
    PHONE: ["我的phone是{}", "call我{}", "Tel：{}，谢谢", "{} call back please谢谢"],
    ID: ["my 身份证 is {}", "ID号码{}", "{}is my ID号"],
    CARD: ["card号码{}", "信用卡card {}被盗刷", "{}是我的Visa卡"],
    EMAIL: ["email我：{}", "我的mail是{}哦", "{}这个邮箱"],
}
# Where numbers that must stay appear: after the words that introduce them, in Chinese and English.
_CLEAN = {
    "order": ["订单号{}还没发货", "我的订单{}一直没到", "订单编号：{}", "order #{} arrived late", "Order ID: {}"],
    "tracking": ["快递单号{}", "运单号{}查不到", "tracking number {}", "tracking: {} shows nothing"],
    "invoice": ["发票号码{}", "交易流水号{}", "invoice {} is wrong", "transaction {} failed"],
    "date": ["{}下单的商品", "我在{}买的", "on {} it broke", "{} was the date"],
    "time": ["{}之前送到", "at {} today", "约在{}见面"],
    "price": ["金额{}，共3件", "价格是{}", "I paid {} for 12 items", "it costs {} now"],
    "misc": ["版本号{}", "version {} crashes", "第{}期活动", "邮编{}", "room {} is cold", "{}个人点赞"],
}
_TEMPLATES = {"zh": _ZH, "en": _EN, "mixed": _MIXED}
_JOIN = {"zh": "，", "en": ". ", "mixed": "，"}


def _identifier(gen: _Generator, kind: str, language: str) -> str:
    if kind == PHONE:
        return gen.maybe_full_width(gen.phone())
    if kind == ID:
        us = language == "en" and gen.r.random() < 0.6
        return gen.ssn() if us else gen.maybe_full_width(gen.resident_id())
    if kind == CARD:
        return gen.maybe_full_width(gen.card())
    return gen.maybe_full_width(gen.email()) if gen.r.random() < 0.3 else gen.email()


def _row(gen: _Generator, language: str, clean: bool) -> LabelledRow:
    positives = _TEMPLATES[language]
    text = ""
    spans: list[tuple[str, int, int]] = []
    numbers: list[tuple[str, int, int]] = []
    for i in range(gen.r.randint(1, 3)):
        if i:
            text += _JOIN[language]
        if clean or gen.r.random() < 0.35:
            value, context = gen.negative()
            template, labels, label = gen.r.choice(_CLEAN.get(context) or positives[context]), numbers, context
        else:
            label = gen.r.choice([PHONE, PHONE, ID, CARD, EMAIL])
            template, value, labels = gen.r.choice(positives[label]), _identifier(gen, label, language), spans
        before, after = template.split("{}")
        text += before
        labels.append((label, len(text), len(text) + len(value)))
        text += value + after
    end = "。" if language != "en" else "."
    return LabelledRow(text + end, language, tuple(spans), tuple(numbers))


def evaluation_set(seed: int = 18, rows: int = 600) -> list[LabelledRow]:
    """``rows`` rows, a third each Chinese, English and mixed; one in four is clean (numbers only)."""
    gen = _Generator(seed)
    languages = ["zh", "en", "mixed"]
    return [_row(gen, languages[i % 3], clean=i % 4 == 3) for i in range(rows)]


_PLAIN_ZH = "我们的订单已经发货了请问什么时候能到货物流信息一直没有更新客服回复很慢希望尽快处理谢谢质量很好包装"
_PLAIN_EN = (
    "the package arrived late and support did not answer my emails for days great quality would buy again".split()
)


def clean_sentence(gen: random.Random, language: str) -> str:
    """A sentence without any number (filler for the benchmark's realistic mix)."""
    if language == "en":
        return " ".join(gen.choice(_PLAIN_EN) for _ in range(gen.randint(6, 24)))
    return "".join(gen.choice(_PLAIN_ZH) for _ in range(gen.randint(12, 48)))
