"""Teacher backends (``model.teacher_backend``): ``LocalTeacher`` (default), ``VLLMTeacher``, ``ServerTeacher``."""

from rlad_pl.teacher.base import TEACHER_INPUTS, TeacherScorer, teacher_layout
from rlad_pl.teacher.local import LocalTeacher
from rlad_pl.teacher.server import ServerTeacher
from rlad_pl.teacher.vllm import VLLMTeacher

__all__ = ["TeacherScorer", "LocalTeacher", "VLLMTeacher", "ServerTeacher", "teacher_layout", "TEACHER_INPUTS"]
