"""The typed config (issue 25): every field is declared once and checked from its declaration; a misspelled key or
a bad value stops with one line naming the key; config.json files with the old flat names still load and resume."""
import json
import os

import numpy as np
import pytest

import dba_jax
from dba_jax import train
from dba_jax.config import RENAMED, ConfigError, base_config, schema, upgrade, validate
from dba_jax.configlib import Field
from helpers import tiny


def _bad_values(f: Field) -> list:
  """Values the declaration must refuse that a ConfigDict still accepts (it checks types, not ranges)."""
  out = []
  choices = f.choices() if callable(f.choices) else f.choices
  if choices:
    out.append("no_such_choice")
  for bound, delta in ((f.ge, -1), (f.gt, 0), (f.le, 1), (f.lt, 0)):
    if bound is not None and isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
      value = type(f.default)(bound + delta) if isinstance(f.default, float) else int(bound + delta)
      out.append(value)
  if isinstance(f.default, tuple) and f.ge is not None:
    out.append(tuple(int(f.ge) - 1 for _ in f.default))
  if isinstance(f.default, tuple) and f.gt is not None:
    out.append(tuple(int(f.gt) for _ in f.default))
  return out


def test_every_declared_bound_and_choice_is_enforced_naming_the_key():
  """For every field with a range or choices: a value outside it stops validation with the key named."""
  checked = 0
  for key, f in schema().fields().items():
    for bad in _bad_values(f):
      c = base_config()
      *path, name = key.split(".")
      node = c
      for p in path:
        node = node[p]
      node[name] = bad
      with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "="):
        validate(c)
      checked += 1
  assert checked >= 100  # ranges and choices of ~130 fields, not a handful


def test_every_field_is_declared_with_a_doc_and_a_checkable_type():
  fields = schema().fields()
  assert len(fields) > 140
  assert all(f.doc for f in fields.values()), [k for k, f in fields.items() if not f.doc]
  assert all(isinstance(f.default, (bool, int, float, str, tuple)) for f in fields.values())
  assert not any(k.startswith("model.sel_") for k in fields)  # the selective fields live in model.selective


def test_a_value_of_the_wrong_type_read_from_json_is_refused():
  c = base_config()
  c.model.hope.cms_periods = (4, 16.5)  # tuples take any entries; the declaration says ints
  with pytest.raises(ConfigError, match=r"model\.hope\.cms_periods=.* must hold int values"):
    validate(c)
  c = base_config()
  c.unlock()
  c.model.bogus = 1
  with pytest.raises(ConfigError, match=r"model\.bogus is not a config key"):
    validate(c)


def test_cross_field_rules_live_with_their_kind():
  with pytest.raises(ConfigError, match=r"model\.dba\.sem_dim=0 must be positive"):
    validate(tiny("standard", attn_kind="dba"))
  with pytest.raises(ConfigError, match=r"model\.selective\.memory_penalty is set but model.attn_kind='standard'"):
    validate(tiny("standard", memory_penalty="paper"))


def test_old_flat_names_are_translated_with_a_message(capsys):
  old = {"model": {"sel_mask_heads": 1, "sel_disable": True, "memory_penalty": "repo", "sem_dim": 8, "d_model": 64}}
  new = upgrade(old, "run/config.json")
  assert new["model"] == {"d_model": 64, "selective": {"selection_heads": 1, "disable_selection": True,
                                                       "memory_penalty": "repo"}, "dba": {"sem_dim": 8}}
  assert "run/config.json: read 4 old model keys under today's names" in capsys.readouterr().err
  assert upgrade(new) == new  # today's names pass unchanged
  assert set(RENAMED) >= {"sel_head", "sel_scan", "sel_combo_lr_scale", "memory_tau", "dba_gate", "null_attn"}


def _flatten_to_old_names(path: str):
  """Rewrite a config.json of today's code into the pre-issue-25 layout (flat sel_* / DBA fields)."""
  with open(path) as f:
    saved = json.load(f)
  m = saved["model"]
  for old, new in RENAMED.items():
    section, field = new.split(".")
    m[old] = m[section][field]
  for section in {v.split(".")[0] for v in RENAMED.values()}:
    del m[section]
  with open(path, "w") as f:
    json.dump(saved, f)


def test_an_old_workdir_loads_and_resumes(tmp_path, capsys):
  c = validate(tiny("standard", attn_kind="selective", memory_penalty="paper", scan_layers=False))
  c.train.steps, c.train.ckpt_every, c.train.eval_every = 2, 2, 2
  workdir = str(tmp_path / "run")
  train.train(c, workdir, quiet=True)
  _flatten_to_old_names(os.path.join(workdir, "config.json"))
  model, loaded = dba_jax.load_model(workdir)
  assert loaded.model.selective.memory_penalty == "paper" and loaded.model.to_dict() == c.model.to_dict()
  assert "old model keys under today's names" in capsys.readouterr().err
  c.train.steps = 4
  train.train(c, workdir, quiet=True)  # the same model: resumes from step 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
  with open(os.path.join(workdir, "runs.jsonl")) as f:
    assert [json.loads(line)["resumed_from"] for line in f] == [None, 2]
