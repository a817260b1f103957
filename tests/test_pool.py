import json
from dataclasses import replace

import pytest
import yaml

from dynrules.engine.pool import Rule, RulePool, load_pool
from dynrules.errors import InputError

REQUIRED_CATEGORIES = {
    "violence",
    "self_harm",
    "sexual_content",
    "child_safety",
    "hate_harassment",
    "privacy",
    "cybercrime",
    "fraud",
    "illegal_trade",
    "extremism",
    "dangerous_science",
    "misinformation",
    "manipulation",
    "specialised_advice",
    "intellectual_property",
    "helpfulness",
}
RULES = [
    {"id": "a", "text": "The response is kind.", "category": "tone"},
    {"id": "b", "text": "The response answers the question.", "polarity": "helpfulness"},
]


def test_default_pool():
    pool = load_pool()
    assert load_pool("default") is pool
    assert pool.name == "dynrules-default" and len(pool) == 100
    assert len(set(pool.ids)) == 100
    assert len({t.casefold() for t in pool.texts}) == 100
    assert REQUIRED_CATEGORIES <= set(pool.categories)
    help_rules = [r for r in pool if r.category == "helpfulness"]
    assert 10 <= len(help_rules) <= 12 and all(r.polarity == "helpfulness" for r in help_rules)
    assert all(r.polarity == "harm" for r in pool if r.category != "helpfulness")
    assert all(pool.index_of(rid) == i for i, rid in enumerate(pool.ids))
    with pytest.raises(KeyError, match="nope"):
        pool.index_of("nope")
    d = pool.to_dict()
    assert d["name"] == pool.name and d["hash"] == pool.content_hash and len(d["ids"]) == 100


def test_hash_stable_and_sensitive():
    pool = load_pool()
    h = pool.content_hash
    assert len(h) == 64 and h == RulePool("x", pool.rules).content_hash
    assert h == RulePool(pool.name, tuple(replace(r, category="other") for r in pool)).content_hash
    reworded = (replace(pool.rules[0], text=pool.rules[0].text + " Really."),) + pool.rules[1:]
    assert RulePool(pool.name, reworded).content_hash != h
    swapped = (pool.rules[1], pool.rules[0]) + pool.rules[2:]
    assert RulePool(pool.name, swapped).content_hash != h
    flipped = (replace(pool.rules[0], polarity="helpfulness"), *pool.rules[1:])
    assert RulePool(pool.name, flipped).content_hash != h


def _expected(name):
    return RulePool(
        name,
        (
            Rule("a", "tone", "The response is kind."),
            Rule("b", "custom", "The response answers the question.", "helpfulness"),
        ),
    )


def test_round_trip_yaml_json(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(yaml.safe_dump({"name": "mine", "rules": RULES}))
    assert load_pool(y) == _expected("mine")
    j = tmp_path / "p.json"
    j.write_text(json.dumps(RULES))
    assert load_pool(str(j)) == _expected("p")
    assert load_pool(y).content_hash == load_pool(j).content_hash


def test_round_trip_text(tmp_path):
    t = tmp_path / "rules.txt"
    t.write_text("# my rules\n\nThe response is kind.\n  # indented comment\n  Second   rule.  \n")
    pool = load_pool(t)
    assert pool.name == "rules" and pool.ids == ("rule_001", "rule_002")
    assert pool.texts == ("The response is kind.", "Second rule.")
    assert set(pool.categories) == {"custom"}


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.yaml", "rules: [a, {b", "cannot parse"),
        ("bad.json", "{not json", "cannot parse"),
        ("empty.yaml", "", "empty"),
        ("empty.json", '{"rules": []}', "empty"),
        ("empty.txt", "# only a comment\n\n", "empty"),
        ("notext.yaml", "rules: [{id: a}]", "rule 1.*no text"),
        ("blank.yaml", "rules: [{id: a, text: ok}, {id: b, text: '  '}]", "rule 2.*empty"),
        ("noid.yaml", "rules: [{text: ok}]", "rule 1.*no id"),
        ("dupid.yaml", "rules: [{id: a, text: one}, {id: a, text: two}]", "duplicate id 'a'"),
        (
            "duptext.yaml",
            "rules: [{id: a, text: Be Kind.}, {id: b, text: ' be  kind. '}]",
            r"rule 2 \(id 'b'\).*rule 1 \(id 'a'\)",
        ),
        ("duptext.txt", "Be kind.\n# c\nBE KIND.\n", "line 3.*line 1"),
        ("pol.yaml", "rules: [{id: a, text: ok, polarity: maybe}]", "unknown polarity 'maybe'"),
        ("scalar.yaml", "rules: [just a string]", "expected a mapping"),
    ],
)
def test_validation_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=match) as err:
        load_pool(path)
    assert str(path) in str(err.value)


def test_validation_fields(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nA\n")
    with pytest.raises(InputError) as err:
        load_pool(path)
    assert (err.value.line, err.value.field) == (2, "text")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError, match="not found") as err:
        load_pool(path)
    assert str(path) in str(err.value)
