"""Bad input fails fast with an error naming the field or file; command-line lengths replace the config file's.

The command-line tests launch ``python -m transfer.train`` and check the exit code, that the message names the
field, and that it came before any work: no workdir created, no data or step lines. ``transfer.config_check`` is
imported inside the tests that use it, so on code without it the command-line tests still run and show how they
fail.
"""
import csv
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, tiny_config


def _config_file(tmp_path, body: str) -> str:
  """A config file (``get_config(arg)``) built on the tests' tiny config."""
  path = tmp_path / "cfg.py"
  path.write_text("import sys\n"
                  f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
                  "from conftest import tiny_config\n\n"
                  "def get_config(arg=''):\n" + "".join(f"  {line}\n" for line in body.splitlines()))
  return str(path)


def _assert_failed_before_work(out, workdir, code: int, *expected: str) -> None:
  """Exit ``code``, every ``expected`` text in stderr, no traceback, and no work: the workdir was never created
  and nothing was loaded or trained (no 'data:' or step lines)."""
  assert out.returncode == code, (out.returncode, out.stderr[-3000:])
  for text in expected:
    assert text in out.stderr, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert not os.path.exists(workdir)
  assert "data:" not in out.stdout and "step " not in out.stdout, out.stdout[-2000:]


# ------------------------------------------------------------------------------------------------------------------
# Bad values on the command line: named, before any data or compilation.
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    # today: ZeroDivisionError tracebacks (batch_size, grad_accum_steps), after data loading
    ("--config.batch_size=0", "error: config.batch_size=0: expected an integer >= 1"),
    ("--config.grad_accum_steps=0", "error: config.grad_accum_steps=0: expected an integer >= 1"),
    # today: a ZeroDivisionError after the first step compiled
    ("--config.log_every=0", "error: config.log_every=0: expected an integer >= 1"),
    # today: a ZeroDivisionError at the final evaluation
    ("--config.eval_batch_size=0", "error: config.eval_batch_size=0: expected an integer >= 1"),
    # today: accepted, and a checkpoint saved every 2 steps
    ("--config.checkpoint.every_steps=-1", "error: config.checkpoint.every_steps=-1: expected an integer >= 0"),
])
def test_cli_bad_value_fails_before_work_naming_the_field(tmp_path, override, message):
  workdir = str(tmp_path / "w")
  out = run_cli(["--config", "tests/tiny_config.py", "--workdir", workdir, override], timeout=300)
  _assert_failed_before_work(out, workdir, 1, message)


def test_cli_bad_param_rule_fails_before_work_naming_the_rule(tmp_path):
  """A rule that is not a (regex, dict) pair: today 'too many values to unpack (expected 2)', naming nothing."""
  config = _config_file(tmp_path, 'return tiny_config(param_rules=[("head/.*", {}), "backbone/.*"])')
  workdir = str(tmp_path / "w")
  out = run_cli(["--config", config, "--workdir", workdir], timeout=300)
  _assert_failed_before_work(out, workdir, 1, "config.param_rules[1] must be a (regex, value) pair, got 'backbone/.*'")


def test_cli_unknown_field_is_a_command_line_error(tmp_path):
  """ml_collections' locked config rejects a field the config does not have (exit 2), naming it."""
  workdir = str(tmp_path / "w")
  out = run_cli(["--config", "tests/tiny_config.py", "--workdir", workdir, "--config.total_epoch=2"])
  _assert_failed_before_work(out, workdir, 2, "error in the command line:", "'total_epoch'",
                             'Did you mean "total_epochs"')
  out = run_cli(["--config", "tests/tiny_config.py", "--workdir", workdir, "--config.total_epoch=None"])
  _assert_failed_before_work(out, workdir, 2, "--config.total_epoch=None: config has no field 'total_epoch'; "
                                              "did you mean 'total_epochs'?")


# ------------------------------------------------------------------------------------------------------------------
# Lengths on the command line.
# ------------------------------------------------------------------------------------------------------------------
# On the test ViT (no network is under test here; its step compiles in a quarter of the EfficientNet's time).
EPOCHS_CONFIG = ("c = tiny_config(total_steps=None, total_epochs=50.0, **{'schedule.warmup_steps': None, "
                 "'schedule.warmup_epochs': 1.0, 'checkpoint.every_steps': 0, 'model.name': 'vit-test8', "
                 "'model.depth': None})\nreturn c")


def test_cli_none_is_accepted_for_a_float_field(tmp_path):
  """``--config.total_epochs=None`` reaches the config (today: 'error in the command line', exit 2). The file sets
  only total_epochs, so the config is then left without a length: the validation says so, before any work."""
  workdir = str(tmp_path / "w")
  out = run_cli(["--config", _config_file(tmp_path, EPOCHS_CONFIG), "--workdir", workdir,
                 "--config.total_epochs=None"], timeout=300)
  _assert_failed_before_work(out, workdir, 1, "config.total_steps and config.total_epochs are both None")


def test_cli_length_replaces_the_config_files(tmp_path):
  """The file sets total_epochs=50 and warmup_epochs=1; the command line's total_steps and warmup_steps replace
  them (today: 'set only one of total_steps and total_epochs', exit 1), and warmup_epochs=None is accepted."""
  workdir = tmp_path / "w"
  out = run_cli(["--config", _config_file(tmp_path, EPOCHS_CONFIG), "--workdir", str(workdir),
                 "--config.total_steps=2", "--config.schedule.warmup_epochs=None", "--config.schedule.warmup_steps=1"],
                timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "note: --config.total_steps=2 replaces the config file's total_epochs=50.0, now None" in out.stdout
  assert "warmup_epochs=1.0, now None" not in out.stdout   # the command line cleared it itself
  saved = json.load(open(workdir / "config.json"))
  assert (saved["total_steps"], saved["total_epochs"]) == (2, None)
  assert (saved["schedule"]["warmup_steps"], saved["schedule"]["warmup_epochs"]) == (1, None)
  assert json.load(open(workdir / "results.json"))["step"] == 2


def _epochs_config():
  c = tiny_config(total_steps=None, total_epochs=50.0,
                  **{"schedule.warmup_steps": None, "schedule.warmup_epochs": 1.0})
  c.lock()
  return c


def test_resolve_lengths_last_one_said_wins():
  from transfer import config_check
  notes = []
  c = _epochs_config()
  c.total_steps, c.schedule.warmup_steps = 20, 3      # what the command line set
  config_check.resolve_lengths(c, ["total_steps", "schedule.warmup_steps"], notes.append)
  assert (c.total_steps, c.total_epochs, c.schedule.warmup_steps, c.schedule.warmup_epochs) == (20, None, 3, None)
  assert notes == ["note: --config.total_steps=20 replaces the config file's total_epochs=50.0, now None",
                   "note: --config.schedule.warmup_steps=3 replaces the config file's schedule.warmup_epochs=1.0, now "
                   "None"]
  config_check.validate(c)

  c = tiny_config(total_epochs=4.0)   # the file sets total_steps=6; the command line total_epochs
  config_check.resolve_lengths(c, ["total_epochs"], notes.append)
  assert (c.total_steps, c.total_epochs) == (None, 4.0) and "total_steps=6, now None" in notes[-1]

  c = tiny_config(total_steps="auto", total_epochs=4.0)   # 'auto' is a length the file gave too
  config_check.resolve_lengths(c, ["total_epochs"], notes.append)
  assert (c.total_steps, c.total_epochs) == (None, 4.0)

  c = _epochs_config()   # nothing on the command line: the file's own conflict stays an error
  c.total_steps = 20
  config_check.resolve_lengths(c, [], notes.append)
  with pytest.raises(ValueError, match=r"config.total_steps=20 and config.total_epochs=50.0 are both set"):
    config_check.validate(c)

  c = _epochs_config()   # both given on the command line: no telling which was meant
  c.total_steps = 20
  with pytest.raises(ValueError, match=r"the command line sets both --config.total_steps=20 and "
                                       r"--config.total_epochs=50.0"):
    config_check.resolve_lengths(c, ["total_steps", "total_epochs"], notes.append)

  c = _epochs_config()   # --config.total_steps=None clears nothing
  config_check.resolve_lengths(c, ["total_steps"], notes.append)
  assert c.total_epochs == 50.0


def test_none_and_list_overrides():
  from transfer import config_check
  argv = ["prog", "--config", "x.py", "--config.total_epochs=None", "--config.data.augment=none",
          "-config.model.pretrained=None", "--config.sharding_rules=[('.*attention.*', 'tensor'), ('.*', 'fsdp')]",
          "--workdir=w"]
  kept, values = config_check.split_value_overrides(argv)
  assert kept == ["prog", "--config", "x.py", "--config.data.augment=none", "--workdir=w"]
  assert values == [("total_epochs", None), ("model.pretrained", None),
                    ("sharding_rules", [(".*attention.*", "tensor"), (".*", "fsdp")])]
  c = tiny_config(total_epochs=2.0, **{"model.pretrained": "efficientnet-lite0"})
  c.lock()
  config_check.set_values(c, values)
  assert c.total_epochs is None and c.model.pretrained is None
  assert list(c.sharding_rules) == [(".*attention.*", "tensor"), (".*", "fsdp")]
  with pytest.raises(ValueError, match=r"--config.schedule.warmup_epoch=None: config.schedule has no field "
                                       r"'warmup_epoch'; did you mean 'warmup_epochs'\?"):
    config_check.set_values(c, [("schedule.warmup_epoch", None)])
  with pytest.raises(ValueError, match=r"--config.seed=\[...\]: config.seed is not a list field"):
    config_check.set_values(c, [("seed", [1])])
  with pytest.raises(ValueError, match=r"--config.param_rules=\[\('\.\*', \{\}\): not a Python list literal"):
    config_check.split_value_overrides(["--config.param_rules=[('.*', {})"])
  with pytest.raises(ValueError, match=r"not a Python list literal"):   # never evaluated as code
    config_check.split_value_overrides(["--config.param_rules=[__import__('os').getcwd()]"])


def test_cli_list_override_reaches_the_run_config():
  """``--config.sharding_rules=[...]`` through the trainer's command-line parser; a bad rule is a command-line
  error naming the field, before anything runs."""
  from transfer import train
  config, overrides = train.command_line_config(
      ["prog", "--config", os.path.join(ROOT, "configs", "digits_efficientnet.py"),
       "--config.sharding_rules=[('.*', 'replicate')]", "--config.param_rules=[('.*', {'freeze': True})]"])
  assert list(config.sharding_rules) == [(".*", "replicate")] and list(config.param_rules) == [(".*", {"freeze": True})]
  assert {"sharding_rules", "param_rules"} <= set(overrides)
  with pytest.raises(train.CommandLineError, match=r"--config.sharding_rules=\[\(: not a Python list literal"):
    train.command_line_config(["prog", "--config", os.path.join(ROOT, "configs", "digits_efficientnet.py"),
                               "--config.sharding_rules=[("])


# ------------------------------------------------------------------------------------------------------------------
# validate(): every field's type and range.
# ------------------------------------------------------------------------------------------------------------------
def test_validate_accepts_every_shipped_config():
  """No false alarms: each configs/*.py (with its default argument, or its EXAMPLE_ARG where it needs one) and the
  tests' tiny configs pass."""
  from transfer import config_check
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f[0] != "_")
  assert len(names) >= 6
  for name in names:
    module = importlib.import_module(f"configs.{name}")
    get_config = module.get_config
    arg = getattr(module, "EXAMPLE_ARG", "")
    config_check.validate(get_config(*[arg] * len(inspect.signature(get_config).parameters)))
  config_check.validate(tiny_config())
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  config_check.validate(importlib.import_module("tiny_config").get_config())
  config_check.validate(importlib.import_module("tiny_image_config").get_config("/some/folder"))


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, "config.seed=-1: expected an integer in [0, 9223372036854775807]"),
    ("batch_size", -4, "config.batch_size=-4: expected an integer >= 1"),
    ("eval_batch_size", 0, "config.eval_batch_size=0: expected an integer >= 1"),
    ("checkpoint.keep_last", 0, "config.checkpoint.keep_last=0: expected an integer >= 1"),
    ("schedule.lr", -0.1, "config.schedule.lr=-0.1: expected a number >= 0"),
    ("schedule.lr", float("nan"), "config.schedule.lr=nan: expected a number >= 0"),
    ("model.dropout", 1.0, "config.model.dropout=1.0: expected a number in [0, 1)"),
    ("model.drop_path", -0.1, "config.model.drop_path=-0.1: expected a number in [0, 1)"),
    ("label_smoothing", 1.0, "config.label_smoothing=1.0: expected a number in [0, 1)"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0: expected a number in [0, 1)"),
    ("optimizer.eps", 0.0, "config.optimizer.eps=0.0: expected a number > 0"),
    ("optimizer.momentum", 1.0, "config.optimizer.momentum=1.0: expected a number in [0, 1)"),
    ("optimizer.weight_decay", -1e-4, "config.optimizer.weight_decay=-0.0001: expected a number >= 0"),
    ("optimizer.name", "adam", "config.optimizer.name: 'adam' is not one of ['adamw', 'sgd']; did you mean 'adamw'?"),
    ("schedule.decay", "cosin", "config.schedule.decay: 'cosin' is not one of ['cosine', 'linear', 'constant']"),
    ("feature_cache", "yes", "config.feature_cache: 'yes' is not one of ['auto', 'on', 'off']"),
    ("model.backbone_mode", "eval", "config.model.backbone_mode: 'eval' is not one of ['auto', 'train', 'inference']"),
    ("model.dtype", "float16", "config.model.dtype: 'float16' is not one of ['bfloat16', 'float32']"),
    ("model.name", "resnet5", "config.model.name: unknown model 'resnet5'; available:"),
    ("data.name", "cifar", "config.data.name: unknown dataset 'cifar'; available:"),
    ("task", "classify", "config.task: 'classify' is not one of ['auto', "),
    ("checkpoint.best_mode", "maximum", "config.checkpoint.best_mode: 'maximum' is not one of ['auto', 'max', 'min']"),
    ("total_steps", 2.5, "config.total_steps=2.5: expected 'auto' or an integer >= 1 (or None)"),
    ("total_steps", 0, "config.total_steps=0: expected 'auto' or an integer >= 1 (or None)"),
    ("mixup", -0.1, "config.mixup=-0.1: expected 'auto' or a number >= 0"),
    ("data.resolution", "large", "config.data.resolution='large': expected 'auto' or an integer >= 1"),
    ("data.test_fraction", 1.0, "config.data.test_fraction=1.0: expected a number in (0, 1)"),
    ("data.val_fraction", 1.0, "config.data.val_fraction=1.0: expected a number in [0, 1)"),
    # model selection on the reported split, or on a validation split that does not exist
    ("checkpoint.best_metric", "eval/accuracy", "config.checkpoint.best_metric='eval/accuracy' would choose the "
     "checkpoint on the eval split, which is then reported: set config.data.val_fraction (e.g. 0.1) and use "
     "'val/accuracy'"),
    ("checkpoint.best_metric", "val/loss", "config.checkpoint.best_metric='val/loss' needs a validation split: set "
     "config.data.val_fraction"),
    ("data.max_length", 1, "config.data.max_length=1: expected an integer >= 2"),
    ("data.split_seed", -3, "config.data.split_seed=-3: expected an integer in [0, 4294967295]"),
    ("layer_decay", 1.5, "config.layer_decay=1.5: expected a number in [0, 1]"),
    ("eval_every", -1, "config.eval_every=-1: expected an integer >= 0"),
    ("fault.kill_at_step", 0, "config.fault.kill_at_step=0: expected an integer >= 1 (or None)"),
    ("model.input_norm", "imagenet21k", "config.model.input_norm='imagenet21k': use 'auto', one of"),
    ("data.strict", "yes", "config.data.strict='yes': expected True or False"),
])
def test_validate_names_the_bad_field(field, value, message):
  from transfer import config_check
  c = tiny_config()
  if field == "data.strict":   # a bool field: the ConfigDict itself refuses a str, so replace the field
    del c.data["strict"]
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError) as err:
    config_check.validate(c)
  assert message in str(err.value)


def test_validate_checks_every_field_of_the_base():
  """Each leaf field of config_base.base() is checked: set to a value of no field's type, validate names it. A field
  added to the base without a check in config_check.validate fails here."""
  from transfer import config_base, config_check

  def leaves(node, prefix=""):
    for key in node.keys():
      value = node[key]
      yield from leaves(value, f"{prefix}{key}.") if hasattr(value, "keys") else [f"{prefix}{key}"]

  paths = list(leaves(config_base.base()))
  assert len(paths) > 60 and "checkpoint.every_steps" in paths
  unchecked = []
  for path in paths:
    c = tiny_config()
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    del node[leaf]   # the ConfigDict's own type check would refuse the stray value
    node[leaf] = object()
    try:
      config_check.validate(c)
      unchecked.append(path)
    except ValueError as e:
      if f"config.{path}" not in str(e):
        unchecked.append(path)
  assert not unchecked, f"fields validate() does not check: {unchecked}"


def test_validate_lengths_and_cross_field_rules():
  from transfer import config_check
  cases = [
      (dict(total_epochs=0.0, total_steps=None), "config.total_epochs=0.0: expected a number > 0 (or None)"),
      (dict(total_steps=None), "config.total_steps and config.total_epochs are both None: set one"),
      ({"schedule.warmup_epochs": -1.0, "schedule.warmup_steps": None},
       "config.schedule.warmup_epochs=-1.0: expected a number >= 0 (or None)"),
      ({"schedule.warmup_epochs": 1.0}, "config.schedule.warmup_steps=2 and config.schedule.warmup_epochs=1.0 are "
                                        "both set"),
      ({"schedule.warmup_steps": 6}, "config.schedule.warmup_steps=6 must be shorter than config.total_steps=6"),
      (dict(batch_size=16, grad_accum_steps=3), "config.batch_size=16 is not divisible by config.grad_accum_steps=3"),
      (dict(task="regression", label_smoothing=0.1), "config.label_smoothing applies to classes"),
      ({"data.name": "text_files"}, "config.data.train_file is not set: data.name='text_files'"),
      ({"data.labels": ["a", "a"]}, "config.data.labels=['a', 'a']: expected a list of distinct class names"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError) as err:
      config_check.validate(tiny_config(**overrides))
    assert message in str(err.value), (overrides, str(err.value))


def test_validate_reports_every_problem_at_once():
  from transfer import config_check
  c = tiny_config(batch_size=0, log_every=0, **{"checkpoint.every_steps": -2, "schedule.decay": "step"})
  with pytest.raises(ValueError) as err:
    config_check.validate(c)
  text = str(err.value)
  assert text.startswith("4 config problems:\n")
  for field in ("config.batch_size=0", "config.log_every=0", "config.checkpoint.every_steps=-2",
                "config.schedule.decay: 'step'"):
    assert field in text


def test_validate_rejects_a_field_the_base_does_not_define():
  """A misspelt field in a config file would be silently ignored; it is an error naming the closest field."""
  from transfer import config_check
  with pytest.raises(ValueError, match=r"config.total_epoch: not a config field; did you mean total_epochs\?"):
    config_check.validate(tiny_config(total_epoch=3.0))
  with pytest.raises(ValueError, match=r"config.model.drop: not a config field; did you mean model.dropout\?"):
    config_check.validate(tiny_config(**{"model.drop": 0.1}))


@pytest.mark.parametrize("param_rules, message", [
    ([("head/.*", {}), "backbone/.*"], "config.param_rules[1] must be a (regex, value) pair, got 'backbone/.*'"),
    ([("head/.*", {}, 1)], "config.param_rules[0] must be a (regex, value) pair"),
    ([("head/(", {})], "config.param_rules[0]: invalid regex 'head/('"),
    ([(".*", "freeze")], "config.param_rules[0] ('.*'): its value 'freeze' is not a dict"),
    ([(".*", dict(lr=0.1))], "config.param_rules[0] ('.*'): unknown field(s) ['lr']; valid fields:"),
    ([(".*", dict(lr_mult=-1.0))], "config.param_rules[0] ('.*'): lr_mult=-1.0: expected a number >= 0"),
    ([(".*", dict(freeze="yes"))], "config.param_rules[0] ('.*'): freeze='yes': expected True or False"),
    ("head/.*", "config.param_rules='head/.*': expected a list of (regex, dict) pairs"),
])
def test_validate_param_rules(param_rules, message):
  from transfer import config_check
  c = tiny_config()
  del c["param_rules"]   # a list-typed field; replaced whole so a str can be tried too
  c.param_rules = param_rules
  with pytest.raises(ValueError) as err:
    config_check.validate(c)
  assert message in str(err.value)


# ------------------------------------------------------------------------------------------------------------------
# Text files: long fields, other encodings.
# ------------------------------------------------------------------------------------------------------------------
def test_text_file_field_longer_than_the_csv_default_limit(tmp_path):
  """A 200,000-character field (csv's default limit is 131,072: today 'field larger than field limit')."""
  from transfer.data import text_files
  default = csv.field_size_limit(131072)   # as a fresh process has it, whatever ran before
  try:
    long = "word " * 40_000
    for ext, sep in ((".tsv", "\t"), (".csv", ",")):
      path = tmp_path / f"long{ext}"
      path.write_text(f"sentence{sep}label\nshort{sep}0\n{long}{sep}1\n", encoding="utf-8")
      rows = text_files.read_rows(str(path), ["sentence", "label"])
      assert [(n, len(r[0]), r[1]) for n, r in rows] == [(2, 5, "0"), (3, 200_000, "1")]
      assert rows[1][1][0] == long
  finally:
    csv.field_size_limit(default)


@pytest.mark.parametrize("name, content, line", [
    ("latin1.tsv", b"sentence\tlabel\nok\t0\ncaf\xe9\t1\n", 3),
    ("latin1.jsonl", b'{"sentence": "ok", "label": 0}\n{"sentence": "caf\xe9", "label": 1}\n', 2),
])
def test_text_file_not_utf8_names_file_line_and_encoding(tmp_path, name, content, line):
  """Today: "'utf-8' codec can't decode byte 0xe9 in position 24", no file, no line."""
  from transfer.data import text_files
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9 at byte \d+ of the line\); "
                                       r"data files must be UTF-8"):
    text_files.read_rows(str(path), ["sentence", "label"])


def test_text_file_byte_order_mark_and_json_rows_that_are_not_objects(tmp_path):
  from transfer.data import text_files
  bom = tmp_path / "bom.tsv"   # Excel's 'UTF-8' export: today the header's first column is '\ufeffsentence'
  bom.write_bytes("sentence\tlabel\nok\t0\n".encode("utf-8-sig"))
  assert text_files.read_rows(str(bom), ["sentence", "label"]) == [(2, ["ok", "0"])]
  scalar = tmp_path / "scalar.jsonl"   # today: TypeError "argument of type 'int' is not iterable"
  scalar.write_text('{"sentence": "ok", "label": 0}\n3\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"scalar.jsonl:2: expected a JSON object with fields \['sentence', 'label'\]"):
    text_files.read_rows(str(scalar), ["sentence", "label"])


# ------------------------------------------------------------------------------------------------------------------
# What main() shows for each kind of exception.
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raised, code, shown, hidden", [
    ("KeyboardInterrupt()", 130, "interrupted: relaunch with the same --workdir to resume", "Traceback"),
    ("FloatingPointError('step 3: train/loss is nan')", 1, "error: step 3: train/loss is nan", "Traceback"),
    ("RuntimeError('a bug')", 1, "Traceback", "error:"),   # unexpected: the whole traceback, for the bug report
])
def test_main_reports_by_exception_kind(tmp_path, raised, code, shown, hidden):
  script = ("import sys\nfrom transfer import train\n"
            f"def fail(config, workdir):\n  raise {raised}\n"
            "train.train = fail\n"
            f"sys.exit(train.main(['train', '--config', 'tests/tiny_config.py', '--workdir', {str(tmp_path)!r}]))\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == code, out.stderr[-3000:]
  assert shown in out.stderr and hidden not in out.stderr, out.stderr[-3000:]
