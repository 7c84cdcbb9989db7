"""The budget-sweep evaluator: accuracy against thinking tokens, the s1 paper's scores, plots."""

from .graders import GRADERS, get_grader
from .metrics import summarize
from .sweep import OfflineBackend, ServerBackend, SweepConfig, run_sweep
from .tasks import Question, load_task

__all__ = ["GRADERS", "get_grader", "summarize", "OfflineBackend", "ServerBackend", "SweepConfig", "run_sweep",
           "Question", "load_task"]
