"""Disk cache of generated responses, for prefixes that do not depend on the student (teacher prefixes).

Teacher-prefix objectives (decoupled-KL cells A and C, offline SFT) sample from a frozen model, so the same prompt,
sampling settings and seed always give the same responses: ``GenerationCache`` stores them as one JSON file per
request (keyed by a hash of the prompt ids, the sampling settings and a model tag) and serves them across epochs
and runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rlad_pl.rollout.sampler import Generation, SamplingParams


class GenerationCache:
    def __init__(self, directory: str | Path, tag: str):
        self.dir, self.tag = Path(directory), tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def key(self, prompt_ids: list[list[int]], params: SamplingParams) -> str:
        blob = json.dumps([self.tag, prompt_ids, asdict(params)], sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()

    def get_or_generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                        generate: Callable[[list[list[int]], SamplingParams], Generation]) -> Generation:
        path = self.dir / f"{self.key(prompt_ids, params)}.json"
        if path.is_file():
            self.hits += 1
            return Generation(**json.loads(path.read_text()))
        self.misses += 1
        gen = generate(prompt_ids, params)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(gen)))
        tmp.replace(path)
        return gen
