"""Pretraining objectives, by the name a recipe's `objective.name` uses.

Adding one: subclass `Objective` (collator + head + loss + metrics) and register it here.
"""

from toolkit.objectives.base import Objective
from toolkit.objectives.clm import CausalLM
from toolkit.objectives.electra import ReplacedTokenDetection
from toolkit.objectives.mlm import MaskedLM
from toolkit.objectives.nsp import MaskedLMWithNSP, NextSentencePrediction

OBJECTIVES: dict[str, type[Objective]] = {
    MaskedLM.name: MaskedLM,
    CausalLM.name: CausalLM,
    MaskedLMWithNSP.name: MaskedLMWithNSP,
    NextSentencePrediction.name: NextSentencePrediction,
    ReplacedTokenDetection.name: ReplacedTokenDetection,
}

__all__ = ["OBJECTIVES", "Objective"]
