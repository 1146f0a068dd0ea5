"""layerdiff: where do two ports of a model first disagree, by how much, and why."""

from layerdiff.api import compare
from layerdiff.caffe import CaffeNet, load_caffe
from layerdiff.comparator import PairResult, Report
from layerdiff.errors import LayerdiffError
from layerdiff.trace import Record, Trace

__version__ = "0.1.0"
__all__ = ["CaffeNet", "LayerdiffError", "PairResult", "Record", "Report", "Trace", "compare",
           "load_caffe", "__version__"]
