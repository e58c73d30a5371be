from rlad_pl.rollout.hf import HFSampler  # noqa: F401
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams  # noqa: F401
