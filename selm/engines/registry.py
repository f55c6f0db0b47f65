"""The ranker of a `RankConfig`: `build_ranker(cfg.rank, key="rank")` picks the class for `cfg.kind`
(rankers.py and llm_pairwise.py hold them; their shared base is ranker_base.py)."""

from __future__ import annotations

from selm.config import RankConfig
from selm.engines.llm_pairwise import LLMPairwiseRanker
from selm.engines.ranker_base import Ranker, RankerError
from selm.engines.rankers import (CallableRanker, HttpJudgeRanker, PairRMRanker, PairwiseRanker,
                                  RewardModelRanker)

RANKERS = {"callable": CallableRanker, "reward_model": RewardModelRanker, "pairwise": PairwiseRanker,
           "pairrm": PairRMRanker, "http_judge": HttpJudgeRanker, "llm_pairwise": LLMPairwiseRanker}


def build_ranker(cfg: RankConfig, key: str = "rank") -> Ranker:
    """The ranker for ``cfg.kind``; ``key`` ("rank", "evaluate.judge") prefixes its error messages."""
    if cfg.kind not in RANKERS:
        raise RankerError(f"{key}.kind: unknown ranker {cfg.kind!r}; one of {', '.join(RANKERS)}")
    return RANKERS[cfg.kind](cfg, key)
