#!/usr/bin/env bash
# Regenerate caffe_pb2.py from caffe.proto; run from the repository root.
python -m grpc_tools.protoc -I layerdiff/caffe --python_out=layerdiff/caffe layerdiff/caffe/caffe.proto
