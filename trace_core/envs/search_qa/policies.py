"""A scripted search policy for the synthetic multi-hop world (the upper anchor for QA tests).

It follows the question's relation chain (task metadata): search the current entity's name,
read the relation's sentence from the retrieved passages, move to the object, and answer once
the chain is done. It uses retrieval for real: if the right passage is not retrieved, it cannot
read the next hop and searches again (and eventually runs out of turns).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trace_core.envs.search_qa.synthetic import read_relation


class ChainFollowerPolicy:
    def __init__(self, task: Mapping[str, Any]):
        meta = task.get("metadata", {})
        if "start" not in meta or "relations" not in meta:
            raise ValueError("ChainFollowerPolicy needs task metadata 'start' and 'relations' (synthetic QA tasks)")
        self.entity: str = meta["start"]
        self.relations: list[str] = list(meta["relations"])
        self.hop = 0

    def act(self, observation: str) -> str:
        """Action text for the turn after `observation` (the prompt on the first turn)."""
        if self.hop < len(self.relations):
            found = read_relation(observation, self.entity, self.relations[self.hop])
            if found is not None:
                self.entity, self.hop = found, self.hop + 1
        if self.hop == len(self.relations):
            return f"I have followed every hop. <answer> {self.entity} </answer>"
        return f"I need the {self.relations[self.hop]} of {self.entity}. <search> {self.entity} </search>"
