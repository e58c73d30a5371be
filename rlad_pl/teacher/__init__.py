"""Teacher backends (``model.teacher_backend``): ``LocalTeacher`` (default), ``VLLMTeacher``, ``ServerTeacher``."""

from rlad_pl.teacher.scorers import (TEACHER_INPUTS, LocalTeacher, ServerTeacher, TeacherScorer, VLLMTeacher,
                                     teacher_layout)

__all__ = ["TeacherScorer", "LocalTeacher", "VLLMTeacher", "ServerTeacher", "teacher_layout", "TEACHER_INPUTS"]
