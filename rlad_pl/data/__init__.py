from rlad_pl.data.chain_sum import ChainSumTask  # noqa: F401
from rlad_pl.data.dataset_task import DatasetTask  # noqa: F401
from rlad_pl.data.prompts import PromptFormat, encode_prompt  # noqa: F401
from rlad_pl.data.rewards import ExactMatchReward, FormatAnswerReward, Reward  # noqa: F401
from rlad_pl.data.tasks import CharFrequencyTask, JSONLTask, Problem, ReasoningGymTask, Task  # noqa: F401
from rlad_pl.data.verifiers import MathVerifier  # noqa: F401
