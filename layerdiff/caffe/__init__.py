"""The Caffe file format: schema, prototxt and caffemodel reading, V1 upgrade. No arithmetic."""

from layerdiff.caffe.net import CaffeLayer, CaffeNet
from layerdiff.caffe.reader import find_model_files, load_caffe, parse_prototxt

__all__ = ["CaffeLayer", "CaffeNet", "find_model_files", "load_caffe", "parse_prototxt"]
