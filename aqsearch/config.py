"""Plain-data concepts shared by every module: schemes, plans, budgets, gates.

Everything here is frozen, hashable where it can be, and round-trips through JSON.

>>> QuantScheme.parse("w4g64")
QuantScheme(bits=4, group=64, sym=False, fzero=False)
>>> str(QuantScheme.parse("w3g32s")), QuantScheme.parse("w4g64f").zero_format
('w3g32s', 'fp16')
>>> Plan.uniform("w4g64").scheme_for("model.layers.0.mlp.up_proj")
QuantScheme(bits=4, group=64, sym=False, fzero=False)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from aqsearch.errors import AqError

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, 256)
PLAN_VERSION = 2
# Version 1 plans (before integer zeros were packed) name the same quantization: their asymmetric
# schemes already had integer-valued zeros, stored in fp16. They load unchanged; only the bytes shrink.
READABLE_PLAN_VERSIONS = (1, 2)

_SCHEME_RE = re.compile(r"^w(\d+)(?:g(\d+))?([a-z]?)$")
_SUFFIXES = {"": "integer zero", "s": "symmetric", "f": "fp16 zero"}


@dataclass(frozen=True, order=True)
class QuantScheme:
    """Bits, group size along the input dimension, and the zero's format.

    ``group=None`` means one group per output row (per-channel), written without ``g``: ``w8``.
    Every group stores an fp16 scale. Its zero (DESIGN.md, "Numerics"):

    - ``w4g64``: a ``bits``-bit integer, packed (GPTQ/AWQ/AutoRound layout): 16 + bits bits a group;
    - ``w4g64f`` (``fzero``): the same zero stored in fp16, as before packed zeros: 32 bits a group;
    - ``w4g64s`` (``sym``): none, the middle code: 16 bits a group.
    """

    bits: int
    group: int | None = 128
    sym: bool = False
    fzero: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise AqError(f"invalid scheme: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group is not None and self.group not in GROUPS:
            raise AqError(
                f"invalid scheme: group size must be one of {', '.join(map(str, GROUPS))}, got {self.group}"
            )
        if self.sym and self.fzero:
            raise AqError("invalid scheme: a symmetric scheme stores no zero, so it has no fp16-zero form")

    @classmethod
    def parse(cls, text: str | QuantScheme) -> QuantScheme:
        """``w{bits}g{group}[s|f]`` (``w4g64``, ``w3g32s``, ``w2g64f``) or ``w{bits}[s|f]`` per-channel."""
        if isinstance(text, QuantScheme):
            return text
        m = _SCHEME_RE.match(str(text).strip())
        if not m:
            raise AqError(f"invalid scheme {text!r}: expected w{{bits}}g{{group}}[s|f], e.g. w4g64, w3g32s or w2g64f")
        if m.group(3) not in _SUFFIXES:
            raise AqError(f"invalid scheme {text!r}: unknown suffix {m.group(3)!r} "
                          f"(none: integer zero, s: symmetric, f: fp16 zero)")
        bits, group, sym, fzero = int(m.group(1)), m.group(2), m.group(3) == "s", m.group(3) == "f"
        if bits not in BITS:
            raise AqError(f"invalid scheme {text!r}: bits must be one of {', '.join(map(str, BITS))}")
        if group is not None and int(group) not in GROUPS:
            raise AqError(f"invalid scheme {text!r}: group size must be one of {', '.join(map(str, GROUPS))}")
        return cls(bits, None if group is None else int(group), sym, fzero)

    @property
    def zero_format(self) -> str:
        """How a group's zero is stored: ``"int"`` (packed, ``bits`` bits), ``"fp16"`` or ``"none"``."""
        return "none" if self.sym else ("fp16" if self.fzero else "int")

    @property
    def meta_bits_per_group(self) -> int:
        """Bits of metadata a group: the fp16 scale plus the zero as stored."""
        return 16 + {"none": 0, "int": self.bits, "fp16": 16}[self.zero_format]

    @property
    def bpw(self) -> float:
        """Bits a weight when the group divides the row and 32 divides the rows (the usual case)."""
        return self.bits + (self.meta_bits_per_group / self.group if self.group else 0.0)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def __str__(self) -> str:
        g = "" if self.group is None else f"g{self.group}"
        return f"w{self.bits}{g}{'s' if self.sym else 'f' if self.fzero else ''}"


def all_schemes(sym: bool = False, fzero: bool = False) -> list[QuantScheme]:
    """Every grouped scheme, fewest bytes last: the candidate set of the engine and the search."""
    return [QuantScheme(b, g, sym, fzero and not sym) for b in sorted(BITS, reverse=True) for g in GROUPS]


@dataclass(frozen=True)
class Plan:
    """Ordered map from layer name (exact, ``re:`` regex, or ``_default``) to a scheme or ``None``.

    ``None`` keeps a layer in full precision. Exact names win over regexes, regexes are tried in
    order, ``_default`` applies last.

    >>> p = Plan.from_json({"version": 2, "layers": {"_default": "w4g64", "re:.*down_proj": "w8g128"}})
    >>> str(p.scheme_for("model.layers.3.mlp.down_proj"))
    'w8g128'
    """

    entries: tuple[tuple[str, QuantScheme | None], ...] = ()
    meta: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def uniform(cls, scheme: str | QuantScheme) -> Plan:
        return cls((("_default", QuantScheme.parse(scheme)),))

    @classmethod
    def from_layers(cls, layers: Mapping[str, str | QuantScheme | None]) -> Plan:
        out = []
        for name, s in layers.items():
            if name.startswith("re:"):
                try:
                    re.compile(name[3:])
                except re.error as e:
                    raise AqError(f"invalid plan: bad regex {name!r}: {e}") from None
            out.append((name, None if s is None or s in ("fp16", "none") else QuantScheme.parse(s)))
        return cls(tuple(out))

    def scheme_for(self, name: str) -> QuantScheme | None:
        d = dict(self.entries)
        if name in d:
            return d[name]
        for key, s in self.entries:
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return s
        return d.get("_default")

    def resolve(self, names: Iterable[str]) -> dict[str, QuantScheme | None]:
        """Concrete scheme for every layer name given."""
        return {n: self.scheme_for(n) for n in names}

    def check_names(self, names: Iterable[str]) -> None:
        """Refuse a plan that names a layer the model does not have, or whose regex matches none.

        >>> Plan.from_layers({"model.layers.9.mlp.up_proj": "w4g64"}).check_names(["model.layers.0.mlp.up_proj"])
        Traceback (most recent call last):
        ...
        aqsearch.errors.AqError: the plan names a layer the model does not have: model.layers.9.mlp.up_proj (its layers run from model.layers.0.mlp.up_proj to model.layers.0.mlp.up_proj)
        """
        names = list(names)
        have = set(names)
        for key, _ in self.entries:
            if key == "_default" or key in have:
                continue
            if key.startswith("re:"):
                if not any(re.fullmatch(key[3:], n) for n in names):
                    raise AqError(f"the plan's pattern {key!r} matches no layer of the model")
                continue
            raise AqError(f"the plan names a layer the model does not have: {key}"
                          + (f" (its layers run from {names[0]} to {names[-1]})" if names else ""))

    def to_json(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "layers": {k: (None if s is None else str(s)) for k, s in self.entries},
        }

    @classmethod
    def from_json(cls, obj: Mapping) -> Plan:
        if not isinstance(obj, Mapping) or "layers" not in obj or "version" not in obj:
            raise AqError("invalid plan: expected a JSON object with 'version' and 'layers'")
        if obj["version"] not in READABLE_PLAN_VERSIONS:
            raise AqError(f"invalid plan: version {obj['version']!r} is not supported (expected {PLAN_VERSION})")
        if not isinstance(obj["layers"], Mapping) or not all(
                isinstance(v, str) or v is None for v in obj["layers"].values()):
            raise AqError("invalid plan: 'layers' must map layer names to schemes (or null)")
        return cls.from_layers(obj["layers"])

    @classmethod
    def load(cls, path: str) -> Plan:
        try:
            with open(path) as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise AqError(f"plan file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AqError(f"plan file {path} is not valid JSON: {e}") from None
        except IsADirectoryError:
            raise AqError(f"plan file {path} is a folder") from None
        return cls.from_json(obj)

    def save(self, path: str, extra: Mapping | None = None) -> None:
        from aqsearch.io import write_json_atomic

        obj = self.to_json()
        if extra:
            obj.update(extra)
        write_json_atomic(path, obj)

    def __str__(self) -> str:
        return json.dumps(self.to_json()["layers"])


_BUDGET_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*([A-Za-z]*)\s*$")
# binary units are powers of 1024, decimal ones powers of 1000 (70MB = 70,000,000 B; 70MiB = 73,400,320 B)
_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_UNIT_NAMES = "B, KiB, MiB, GiB (powers of 1024), KB, MB, GB (powers of 1000) or bpw"


@dataclass(frozen=True)
class Budget:
    """A memory target: bytes (``73400320``, ``70MiB``, ``1.5GiB``, ``70MB``) or bits a weight (``3.5bpw``).

    A budget bounds ``bytes``: the stored bytes of the layers a plan governs (codes + scales +
    zeros). ``bpw`` resolves against the number of weights in those layers. ``MiB``/``GiB`` are
    2^20/2^30 bytes, ``MB``/``GB`` 10^6/10^9. No budget may exceed what the layers take in full
    precision (fp16, 16 bits a weight): nothing would be left to decide.

    >>> Budget.parse("3.5bpw").resolve(n_weights=1000)
    437
    >>> Budget.parse("1MiB").resolve(n_weights=10**6), Budget.parse("1MB").resolve(n_weights=10**6)
    (1048576, 1000000)
    """

    value: float
    unit: str  # "bytes" or "bpw"

    @classmethod
    def parse(cls, text: str | int | float | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise AqError(f"invalid budget {text!r}: expected bytes, e.g. 73400320, 70MiB, 1.5GiB, 70MB, or 3.5bpw")
        num, unit = float(m.group(1)), m.group(2).lower()
        if not math.isfinite(num):
            raise AqError(f"invalid budget {text!r}: not a finite number")
        if num <= 0:
            raise AqError(f"invalid budget {text!r}: must be positive")
        if unit == "bpw":
            if num > 32:
                raise AqError(f"invalid budget {text!r}: more than 32 bits a weight makes no sense")
            return cls(num, "bpw")
        if unit not in _UNITS:
            raise AqError(f"invalid budget {text!r}: unknown unit {m.group(2)!r} (use {_UNIT_NAMES})")
        nbytes = int(num * _UNITS[unit])
        if nbytes < 1:
            raise AqError(f"invalid budget {text!r}: less than one byte")
        return cls(float(nbytes), "bytes")

    def resolve(self, n_weights: int) -> int:
        """Bytes allowed for layers holding ``n_weights`` weights; more than they take in full precision
        (16 bits a weight) is refused."""
        limit = int(self.value * n_weights // 8) if self.unit == "bpw" else int(self.value)
        most = 2 * n_weights
        if limit > most:
            raise AqError(f"budget {self} is more than the {n_weights:,} weights it governs take in full precision "
                          f"({most:,} B, 16 bpw): there is nothing to fit")
        return limit

    def __str__(self) -> str:
        return f"{self.value:g}bpw" if self.unit == "bpw" else f"{int(self.value)}B"


@dataclass(frozen=True)
class Gate:
    """Quality thresholds; ``None`` disables a check. Defaults are documented in the README.

    >>> Gate.parse("kl=0.05,ppl=1.05").kl
    0.05
    """

    kl: float | None = 0.1  # max mean KL (nats/token), end to end on held-out text
    kl_p99: float | None = None  # max 99th-percentile KL
    ppl: float | None = None  # max perplexity ratio
    top1: float | None = None  # min top-1 agreement
    # max error a block's quantization adds (mean per-token relative squared error of its output);
    # on SmolLM2 round-to-nearest adds ~0.004 at w4g128, ~0.015 at w3g128, ~0.055 at w2g64
    block_mse: float | None = 0.005

    _KEYS = {"kl": "kl", "p99": "kl_p99", "kl_p99": "kl_p99", "ppl": "ppl", "top1": "top1", "mse": "block_mse"}

    @classmethod
    def parse(cls, text: str | Gate | None) -> Gate:
        if text is None:
            return cls()
        if isinstance(text, Gate):
            return text
        kw: dict[str, float | None] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            if "=" not in part:
                raise AqError(f"invalid gate {text!r}: expected key=value pairs such as kl=0.05,ppl=1.05")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in cls._KEYS:
                raise AqError(f"invalid gate {text!r}: unknown key {k!r} (use {', '.join(sorted(cls._KEYS))})")
            if v.lower() in ("none", "off"):
                kw[cls._KEYS[k]] = None
                continue
            try:
                val = float(v)
            except ValueError:
                raise AqError(f"invalid gate {text!r}: {k} must be a number") from None
            if val <= 0:
                raise AqError(f"invalid gate {text!r}: {k} must be positive")
            kw[cls._KEYS[k]] = val
        return cls(**kw)

    def check(self, m: Mapping[str, float]) -> list[str]:
        """Names of the end-to-end checks that ``m`` (an evaluation's fields) fails."""
        failed = []
        if self.kl is not None and m["kl_mean"] > self.kl:
            failed.append(f"kl_mean {m['kl_mean']:.4g} > {self.kl:g}")
        if self.kl_p99 is not None and m["kl_p99"] > self.kl_p99:
            failed.append(f"kl_p99 {m['kl_p99']:.4g} > {self.kl_p99:g}")
        if self.ppl is not None and m["ppl_ratio"] > self.ppl:
            failed.append(f"ppl_ratio {m['ppl_ratio']:.4g} > {self.ppl:g}")
        if self.top1 is not None and m["top1"] < self.top1:
            failed.append(f"top1 {m['top1']:.4g} < {self.top1:g}")
        return failed

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, a):g}" for k, a in (("kl", "kl"), ("p99", "kl_p99"), ("ppl", "ppl"),
                 ("top1", "top1"), ("mse", "block_mse")) if getattr(self, a) is not None]
        return ",".join(parts)
