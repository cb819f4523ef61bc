"""all-MiniLM-L6-v2 as a frozen feature extractor for AG News: a linear probe on cached sentence embeddings.

  python -m transfer.train --config configs/minilm_ag_news_probe.py --workdir runs/minilm_ag_news_probe

ARGS as configs/minilm_ag_news.py (``data=DIR``); the probe recipe of configs/minilm_sst2_probe.py: the encoder
runs once over the training and test texts, the features are cached in ``WORKDIR/features``, only the head trains.

Expected (2 CPU cores, measured): 0.876 test accuracy, 22 min (while other jobs shared the cores), nearly all
of it the one forward pass over 17,601 texts at length <= 128.
"""
import ml_collections

from configs import minilm_ag_news, minilm_sst2_probe


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return minilm_sst2_probe.as_probe(minilm_ag_news.get_config(arg))
