"""Zoo files: YAML that expands (aliases), repeats keys, or carries invalid
settings is a ZooError naming the file (and the model), never a traceback, a
memory blow-up or a silently dropped model."""

from __future__ import annotations

import os
import threading
import tracemalloc

import pytest

from workflows.errors import ZooError
from workflows.zoo import MAX_ZOO_BYTES, load_zoo, resolve_source

BILLION_LAUGHS = """\
name: laughs
models:
  - name: a
    source: x
    tags:
      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
      b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
      c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
      d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
      e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
      f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
      g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
      h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
      i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _zoo(tmp_path, text: str):
    p = tmp_path / "zoo.yaml"
    p.write_text(text)
    return p


def test_alias_expansion_is_refused_without_expanding(tmp_path):
    p = _zoo(tmp_path, BILLION_LAUGHS)
    tracemalloc.start()
    try:
        with pytest.raises(ZooError, match="aliases") as info:
            load_zoo(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(p) in str(info.value)
    assert peak < 16 << 20, peak
    # a single harmless alias is refused too: the zoo format has no use for them
    with pytest.raises(ZooError, match="aliases"):
        load_zoo(_zoo(tmp_path, "defaults:\n  config: &c {points: [1600]}\nmodels:\n"
                                "  - {name: a, source: x, config: *c}\n"))


@pytest.mark.parametrize("text,needle", [
    # a model silently replaced by a later one with the same key
    ("models:\n  - name: a\n    source: x\n    source: y\n", "duplicate key 'source'"),
    ("models:\n  - {name: a, source: x}\nmodels:\n  - {name: b, source: y}\n", "duplicate key 'models'"),
    ("defaults:\n  config: {points: [1600], points: [1225]}\nmodels:\n  - {name: a, source: x}\n",
     "duplicate key 'points'"),
    ("models:\n  - {name: a, source: x, tags: {t: 1, t: 2}}\n", "duplicate key 't'"),
])
def test_duplicate_keys_are_refused(tmp_path, text, needle):
    with pytest.raises(ZooError, match=needle) as info:
        load_zoo(_zoo(tmp_path, text))
    assert str(tmp_path / "zoo.yaml") in str(info.value)


@pytest.mark.parametrize("config,needle", [
    ("{overrides: [{pattern: 'a.*', colour: 1}]}", "unknown override keys"),
    ("{overrides: [{raw: true}]}", "needs a 'pattern'"),
    ("{overrides: {pattern: 'a.*'}}", "must be a list"),
    ("{overrides: 'a.*'}", "must be a list"),
    ("{points: ['abc']}", "integers"),
    ("{points: [1e999]}", "integers"),
    ("{points: [1600.9]}", "integers"),
    ("{fallback_mae: .nan}", "finite number"),
    ("{fallback_mae: -5}", "finite number"),
    ("{target_mae: 1" + "0" * 400 + "}", "finite number"),
    ("{fallback_mae: 0.0001}", "below the target"),
    ("{max_classes: 2.5}", "integer"),
    ("[1, 2]", "'config' must be a mapping"),
    ("{unknown_field: 1}", "unknown config keys"),
])
def test_invalid_model_configs_name_the_model(tmp_path, config, needle):
    text = f"models:\n  - name: sam-x\n    source: x\n    config: {config}\n"
    with pytest.raises(ZooError, match=needle) as info:
        load_zoo(_zoo(tmp_path, text))
    assert "sam-x" in str(info.value) or "'config' must" in str(info.value)


@pytest.mark.parametrize("text,needle", [
    ("defaults:\n  config: [1]\nmodels:\n  - {name: a, source: x}\n", "defaults.config"),
    ("defaults:\n  tags: x\nmodels:\n  - {name: a, source: x}\n", "defaults.tags"),
    ("name: [1]\nmodels:\n  - {name: a, source: x}\n", "'name' must be a string"),
    ("models:\n  - {name: a, source: x, tags: {t: [1, 2]}}\n", "tag 't'"),
    ("models:\n  - {name: a, source: x, tags: [1]}\n", "'tags' must be a mapping"),
    ("models:\n  - {name: a, source: 'hf://../../etc'}\n", "Hub id"),
    ("models:\n  - {name: a, source: x, revision: 3}\n", "'revision' must be a string"),
    ("- just\n- a list\n", "mapping with a 'models' list"),
    ("models: [\n", "not valid YAML"),
    ("models:\n  - {name: a, source: !!python/object:os.system x}\n", "not valid YAML"),
])
def test_other_malformed_zoos(tmp_path, text, needle):
    with pytest.raises(ZooError, match=needle):
        load_zoo(_zoo(tmp_path, text))


def test_zoo_file_must_be_a_small_regular_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_ZOO_BYTES + "\nmodels:\n  - {name: a, source: x}\n")
    with pytest.raises(ZooError, match="cap"):
        load_zoo(big)
    with pytest.raises(ZooError, match="cannot read"):
        load_zoo(tmp_path / "absent.yaml")
    with pytest.raises(ZooError, match="not a regular file"):
        load_zoo(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.yaml")
        got = []
        t = threading.Thread(target=lambda: got.append(pytest.raises(ZooError, load_zoo, tmp_path / "fifo.yaml")),
                             daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive() and got and "not a regular file" in str(got[0].value)


def test_hub_sources_are_explicit(tmp_path):
    zoo = load_zoo(_zoo(tmp_path, "models:\n  - {name: a, source: 'hf://facebook/sam-vit-base', revision: main}\n"))
    assert zoo.models[0].source == "hf://facebook/sam-vit-base"
    # resolved to the hf:// form that open_source fetches; a bare org/name stays a local path
    assert resolve_source("hf://facebook/sam-vit-base") == "hf://facebook/sam-vit-base"
    assert resolve_source("facebook/sam-vit-base") == "facebook/sam-vit-base"
    from compressor.errors import SourceError
    from compressor.sources import open_source

    with pytest.raises(SourceError, match="no such file"):
        open_source(resolve_source("facebook/sam-vit-bsae"))
