from rlad_pl.rollout.hf import HFSampler  # noqa: F401
from rlad_pl.rollout.mismatch import logprob_mismatch, tis_weights  # noqa: F401
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams  # noqa: F401
from rlad_pl.rollout.vllm import VLLMSampler  # noqa: F401  (imports vllm only in VLLMSampler.setup)
