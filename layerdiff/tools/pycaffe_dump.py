#!/usr/bin/env python
"""Record a layerdiff trace with a real Caffe (pycaffe), for ``layerdiff compare``.

Runs under any Python that can ``import caffe`` and ``numpy``; it does not import layerdiff,
so copy it next to your Caffe install (``layerdiff pycaffe-script > dump.py``) and run:

    python dump.py deploy.prototxt weights.caffemodel input.npy trace.npz

Each layer is run on its own (``net.forward(start=name, end=name)``) and its tops are copied
right after it ran. pycaffe's ``net.blobs`` only keeps the last value of a blob, so a layer that
runs in place (BatchNorm/Scale/ReLU on ``conv1``) would otherwise overwrite what the layer before
it produced. The file follows layerdiff's trace format (docs/trace-format.md).
"""

from __future__ import print_function

import json
import sys
import zipfile

import numpy as np

FORMAT = "layerdiff-trace/1"


def _npy_bytes(arr):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def dump(net, inputs, out_path):
    """Feed ``inputs`` ({blob: array}), run ``net`` layer by layer, write the trace."""
    for name, arr in inputs.items():
        net.blobs[name].reshape(*arr.shape)
        net.blobs[name].data[...] = arr
    if hasattr(net, "reshape"):
        net.reshape()
    names = list(net._layer_names)
    records = []
    arrays = {}
    for i, name in enumerate(names):
        layer = net.layers[i]
        tops = list(net.top_names[name])
        bottoms = list(net.bottom_names[name])
        if layer.type != "Input":
            net.forward(start=name, end=name)
        records.append({"index": i, "name": name, "kind": layer.type, "tops": tops,
                        "bottoms": bottoms, "attrs": {"oracle": "pycaffe"}, "params": []})
        for top in tops:
            arrays["%04d|%s|%s" % (i, name, top)] = np.array(net.blobs[top].data, copy=True)
    header = {"format": FORMAT, "inputs": list(inputs), "records": records,
              "meta": {"framework": "caffe", "engine": "pycaffe", "dtype": "float32"}}
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        raw = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        zf.writestr("__trace__.npy", _npy_bytes(raw))
        for name, arr in inputs.items():
            zf.writestr("input|%s.npy" % name, _npy_bytes(arr))
        for key, arr in arrays.items():
            zf.writestr(key + ".npy", _npy_bytes(arr))
    return len(records)


def main(argv):
    if len(argv) != 5:
        print(__doc__)
        return 2
    import caffe

    prototxt, weights, input_npy, out = argv[1:]
    caffe.set_mode_cpu()
    net = caffe.Net(prototxt, weights, caffe.TEST)
    arr = np.load(input_npy, allow_pickle=False).astype(np.float32)
    n = dump(net, {net.inputs[0]: arr}, out)
    print("wrote %d layer records to %s" % (n, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
