"""``transfer.hf``: reading model folders (single, sharded, safetensors, .bin) and resolving hub ids offline."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from transfer import hf

CONFIG = {"model_type": "bert"}


def _folder(path, **files):
  """A model folder: config.json plus ``name=dict of arrays`` (safetensors) or ``name=str`` (raw text)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(CONFIG, f)
  for name, content in files.items():
    name = name.replace("__", ".")
    if isinstance(content, str):
      with open(os.path.join(path, name), "w") as f:
        f.write(content)
    else:
      save_file(content, os.path.join(path, name))
  return str(path)


def _index(weight_map):
  return json.dumps({"metadata": {}, "weight_map": weight_map})


def test_single_safetensors_and_bfloat16(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  folder = _folder(tmp_path, model__safetensors={"a": a, "b": a.astype(ml_dtypes.bfloat16)})
  config, state = hf.read_folder(folder)
  assert config == CONFIG
  np.testing.assert_array_equal(state["a"], a)
  assert state["b"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(state["b"].astype(np.float32), a)


def test_prefers_safetensors_over_bin(tmp_path):
  torch = pytest.importorskip("torch")
  folder = _folder(tmp_path, model__safetensors={"w": np.ones(2, np.float32)})
  torch.save({"w": torch.zeros(2)}, os.path.join(folder, "pytorch_model.bin"))
  np.testing.assert_array_equal(hf.read_folder(folder)[1]["w"], np.ones(2))
  os.remove(os.path.join(folder, "model.safetensors"))
  np.testing.assert_array_equal(hf.read_folder(folder)[1]["w"], np.zeros(2))


def test_sharded_bin(tmp_path):
  torch = pytest.importorskip("torch")
  folder = _folder(tmp_path, pytorch_model__bin__index__json=_index(
      {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin",
       "c": "pytorch_model-00002-of-00002.bin"}))
  torch.save({"a": torch.ones(2)}, os.path.join(folder, "pytorch_model-00001-of-00002.bin"))
  torch.save({"b": torch.full((3,), 2.0), "c": torch.arange(4)}, os.path.join(folder, "pytorch_model-00002-of-00002.bin"))
  _, state = hf.read_folder(folder)
  assert sorted(state) == ["a", "b", "c"] and state["c"].dtype == np.int64
  np.testing.assert_array_equal(state["b"], [2.0, 2.0, 2.0])


def test_sharded_safetensors_errors(tmp_path):
  one = {"a": np.ones(2, np.float32)}
  folder = _folder(tmp_path / "missing", model__safetensors__index__json=_index(
      {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}),
      **{"model-00001-of-00002__safetensors": one})
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    hf.read_folder(folder)

  folder = _folder(tmp_path / "absent", model__safetensors__index__json=_index({"a": "s1.safetensors", "zz": "s1.safetensors"}),
                   s1__safetensors=one)
  with pytest.raises(ValueError, match="in the index but not in the shard: zz"):
    hf.read_folder(folder)

  folder = _folder(tmp_path / "unlisted", model__safetensors__index__json=_index({"a": "s1.safetensors"}),
                   s1__safetensors={**one, "extra": np.zeros(1, np.float32)})
  with pytest.raises(ValueError, match="in the shard but not in the index: extra"):
    hf.read_folder(folder)


def test_folder_without_weights_or_config(tmp_path):
  folder = _folder(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
    hf.read_folder(folder)
  os.makedirs(tmp_path / "noconfig")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.read_folder(str(tmp_path / "noconfig"))


def _fake_cache(root, repo_id="org/name", revision="0123abcd" * 5):
  repo = root / ("models--" + repo_id.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(revision + "\n")
  return _folder(repo / "snapshots" / revision, model__safetensors={"w": np.ones(1, np.float32)})


def test_resolve_folder_and_hub_cache(tmp_path, monkeypatch):
  assert hf.resolve(str(tmp_path)) == str(tmp_path)
  snapshot = _fake_cache(tmp_path / "hub")
  assert hf.resolve("org/name", cache_dir=str(tmp_path / "hub")) == snapshot
  assert hf.read_folder(snapshot)[0] == CONFIG
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  assert hf.resolve("org/name") == snapshot
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
  assert hf.hub_cache_dir() == str(tmp_path / "elsewhere")


def test_resolve_missing_hub_id_explains(tmp_path):
  cache = str(tmp_path / "hub")
  with pytest.raises(FileNotFoundError) as e:
    hf.resolve("org/absent", cache_dir=cache)
  message = str(e.value)
  assert "org/absent" in message and cache in message and "huggingface-cli download org/absent" in message
  assert "downloaded" in message
  with pytest.raises(FileNotFoundError, match="no such folder"):
    hf.resolve(str(tmp_path / "not" / "here"))
