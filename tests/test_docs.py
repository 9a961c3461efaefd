"""The docs stay true: docs/config.md is the generator's output, the README shows the two commands CI runs,
and every relative link in the README and docs/ points at a file that exists."""
import os
import re

from capo_jax import config_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_config_reference_is_current():
    assert _read("docs", "config.md") == config_doc.render(), (
        "docs/config.md is out of date: run `python -m capo_jax.config_doc --out docs/config.md`")


def test_config_reference_lists_every_key_with_a_comment():
    text = config_doc.render()
    leaves = [k for k, _ in config_doc._leaves(config_doc.get_default_config())]
    assert leaves and all(f"| `{k}` |" in text for k in leaves)


def test_a_key_without_a_comment_is_refused(monkeypatch):
    real = config_doc.schema_comments
    monkeypatch.setattr(config_doc, "schema_comments", lambda: {k: v for k, v in real().items() if k != "rl.clip_low"})
    try:
        config_doc.render()
    except ValueError as exc:
        assert "rl.clip_low" in str(exc)
    else:
        raise AssertionError("render() accepted a key without a comment")


def test_the_two_commands_and_ci_agree():
    text = _read("README.md")
    assert "python -m capo_jax.train --config configs/demo.py" in text
    test_line = [line for line in _read(".ci", "run").splitlines() if "pytest" in line][0].strip()
    assert test_line in text, "the README's test command and .ci/run differ"


def test_relative_links_resolve():
    pages = ["README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")]
    broken = []
    for page in pages:
        base = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page)):
            if "://" not in target and not os.path.exists(os.path.join(base, target)):
                broken.append(f"{page} -> {target}")
    assert not broken, f"broken links: {broken}"
