import json

import pytest

from aqsearch.config import Budget, Gate, Plan, QuantScheme, all_schemes
from aqsearch.errors import AqError


@pytest.mark.parametrize("text,bits,group,sym", [
    ("w4g64", 4, 64, False), ("w3g32s", 3, 32, True), ("w8g256", 8, 256, False), ("w2", 2, None, False),
])
def test_scheme_parse_roundtrip(text, bits, group, sym):
    s = QuantScheme.parse(text)
    assert (s.bits, s.group, s.sym) == (bits, group, sym)
    assert str(s) == text
    assert QuantScheme.parse(str(s)) == s and hash(s) == hash(QuantScheme.parse(text))


@pytest.mark.parametrize("bad,needle", [
    ("w5g64", "bits"), ("w4g48", "group size"), ("w4g128x", "unknown suffix"), ("w4g64sf", "expected"), ("", "expected"), ("4g64", "expected"),
])
def test_scheme_parse_errors(bad, needle):
    with pytest.raises(AqError, match=needle):
        QuantScheme.parse(bad)


def test_plan_resolution_order_and_json():
    p = Plan.from_layers({"model.layers.0.mlp.up_proj": "w8g128", "re:.*mlp.*": "w3g64", "_default": "w4g64",
                          "model.layers.1.self_attn.q_proj": None})
    assert str(p.scheme_for("model.layers.0.mlp.up_proj")) == "w8g128"  # exact beats regex
    assert str(p.scheme_for("model.layers.5.mlp.down_proj")) == "w3g64"
    assert str(p.scheme_for("model.layers.5.self_attn.o_proj")) == "w4g64"
    assert p.scheme_for("model.layers.1.self_attn.q_proj") is None
    again = Plan.from_json(json.loads(json.dumps(p.to_json())))
    assert again == p and again.to_json()["version"] == 2
    # a version-1 plan (fp16-stored integer zeros) names the same quantization and still loads
    v1 = Plan.from_json({"version": 1, "layers": {"_default": "w4g64"}})
    assert v1.scheme_for("x") == QuantScheme(4, 64) and v1.scheme_for("x").zero_format == "int"


@pytest.mark.parametrize("text,fmt,bpw", [("w4g64", "int", 4.3125), ("w4g64f", "fp16", 4.5), ("w4g64s", "none", 4.25),
                                          ("w3g32", "int", 3.59375), ("w2g64f", "fp16", 2.5)])
def test_zero_formats(text, fmt, bpw):
    s = QuantScheme.parse(text)
    assert s.zero_format == fmt and s.bpw == bpw and str(s) == text and QuantScheme.parse(str(s)) == s


def test_plan_errors(tmp_path):
    with pytest.raises(AqError, match="bad regex"):
        Plan.from_layers({"re:([": "w4g64"})
    with pytest.raises(AqError, match="not found"):
        Plan.load(str(tmp_path / "missing.json"))
    (tmp_path / "p.json").write_text('{"version": 9, "layers": {}}')
    with pytest.raises(AqError, match="version"):
        Plan.load(str(tmp_path / "p.json"))
    (tmp_path / "p.json").write_text('{"layers": {"_default": "w4g64"}}')  # no version: not taken for version 1
    with pytest.raises(AqError, match="'version' and 'layers'"):
        Plan.load(str(tmp_path / "p.json"))
    (tmp_path / "p.json").write_bytes(bytes(range(256)))
    with pytest.raises(AqError, match="not valid JSON"):
        Plan.load(str(tmp_path / "p.json"))


def test_plan_naming_a_missing_layer_is_refused():
    names = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    Plan.from_layers({"model.layers.0.mlp.up_proj": "w4g64", "re:.*down_proj": "w8g128", "_default": None}).check_names(names)
    with pytest.raises(AqError, match="does not have: model.layers.99.mlp.down_proj"):
        Plan.from_layers({"model.layers.99.mlp.down_proj": "w4g64"}).check_names(names)
    with pytest.raises(AqError, match="matches no layer"):
        Plan.from_layers({"re:.*dwn_proj": "w4g64"}).check_names(names)


@pytest.mark.parametrize("text,n", [
    ("73400320", 73400320), ("70MiB", 70 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("1MB", 10**6), ("512 KiB", 2**19),
    ("70MB", 70_000_000), ("1.5GB", 1_500_000_000), ("16bpw", 2 * 10**9),
])
def test_budget_bytes(text, n):
    assert Budget.parse(text).resolve(n_weights=10**9) == n


@pytest.mark.parametrize("text", ["1e99", "2000000001", "16.01bpw", "1.9GiB"])
def test_budget_above_full_precision_is_refused(text):
    """A budget beyond what the layers take at 16 bits a weight leaves nothing to fit."""
    with pytest.raises(AqError, match="full precision"):
        Budget.parse(text).resolve(n_weights=10**9)


def test_budget_bpw():
    assert Budget.parse("3.5bpw").resolve(n_weights=106_168_320) == 46_448_640
    assert Budget.parse("4.5bpw").resolve(n_weights=106_168_320) == 59_719_680


@pytest.mark.parametrize("bad", ["-3GiB", "0", "abc", "3parsecs", "40bpw", "", "1e999", "1e999MB"])
def test_budget_errors(bad):
    with pytest.raises(AqError, match="invalid budget"):
        Budget.parse(bad)


def test_budget_unit_errors_name_decimal_units():
    with pytest.raises(AqError, match=r"MB, GB \(powers of 1000\)"):
        Budget.parse("3TB")


def test_gate_parse_and_check():
    g = Gate.parse("kl=0.05,ppl=1.05,top1=0.9,p99=1")
    assert (g.kl, g.ppl, g.top1, g.kl_p99) == (0.05, 1.05, 0.9, 1.0)
    good = {"kl_mean": 0.01, "kl_p99": 0.5, "ppl_ratio": 1.01, "top1": 0.95}
    assert g.check(good) == []
    assert len(g.check({**good, "kl_mean": 0.2, "top1": 0.5})) == 2
    assert Gate.parse("kl=off").kl is None
    for bad in ("kl", "foo=1", "kl=x", "kl=-1"):
        with pytest.raises(AqError):
            Gate.parse(bad)


def test_all_schemes_order():
    s = all_schemes()
    assert len(s) == 16 and s[0] == QuantScheme(8, 32) and s[-1] == QuantScheme(2, 256)
