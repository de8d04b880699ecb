"""YAML read safely: a key set twice refused, nested aliases bounded."""

from __future__ import annotations

import pytest

from ichpipe.base.errors import InputError
from ichpipe.base.yaml_io import load_yaml


def test_yaml_refuses_a_key_set_twice_and_alias_bombs(tmp_path):
    with pytest.raises(InputError, match=r"^c.yaml, line 3: key 'lr' is set twice in one mapping; say each setting"):
        load_yaml("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "c.yaml")
    assert load_yaml("base: &b {lr: 1}\ntrain:\n  <<: *b\n  lr: 2\n", "m.yaml")["train"] == {"lr": 2}  # a merge key
    lol = "a: &a [" + ",".join(["lol"] * 9) + "]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    assert len(lol) < 500
    with pytest.raises(InputError, match=r"^bomb.yaml: expands to more than 100,000 values") as err:
        load_yaml(lol, "bomb.yaml")  # 9**9 values: was 9.4 GB and a multi-GB error line
    assert len(str(err.value)) < 200
