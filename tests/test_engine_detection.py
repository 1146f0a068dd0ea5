"""SSD PriorBox / DetectionOutput: goldens, error paths and the semantics goldens leave open.

The fork goldens' nets also hold Convolution, Permute, Softmax, ... so the golden checks here
teacher-force only this family's layers. DetectionOutput's option space (eta, CORNER_SIZE,
variance_encoded_in_target, batches, no detections) is checked against a literal, loop-by-loop
transcription of the fork's ``ApplyNMSFast``/``DecodeBBox`` below.
"""

from __future__ import annotations

import numpy as np
import pytest
from golden import (
    GOLDEN,
    UNIT_TOL,
    compare,
    compare_sampled,
    load_golden,
    require_shared,
)
from nets import caffe_net

from layerdiff.engine import lookup, make_plan, run_caffe
from layerdiff.errors import LayerdiffError, ModelFormatError, UnsupportedError

MINE = ("PriorBox", "DetectionOutput")
F32 = np.float32


# -- goldens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["priorbox", "detection_output",
                                  "detection_output_per_class_loc"])
def test_fork_golden_teacher_forced(case):
    g = load_golden(GOLDEN / "fork" / case)
    checked = 0
    for rec in g.meta["layers"]:
        if rec["type"] not in MINE:
            continue
        impl = lookup(rec["type"])(g.net.layer(rec["name"]))
        bottoms = [g.value_before(b, rec["index"]) for b in rec["bottoms"]]
        for b in bottoms:
            b.flags.writeable = False
        impl.top_shapes([b.shape for b in bottoms])
        out = impl.forward(bottoms, [])[0]
        compare(out, g.trace[g.key(rec, rec["tops"][0])], UNIT_TOL, f"{case} {rec['name']}")
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("case", ["mobilenet_ssd_chuanqi305", "opencv_res10_ssd_face",
                                  "yufacedetectnet_v1"])
def test_corpus_priorboxes(case):
    """PriorBox reads only its bottoms' shapes, so the sampled corpus traces pin it alone."""
    g = load_golden(GOLDEN / "fork_nets" / case)
    shape_of = {k: tuple(v) for k, v in g.meta["inputs"].items()}
    checked = 0
    for rec in g.meta["layers"]:
        for t in rec["tops"]:
            if g.key(rec, t) + "|shape" in g.trace.files:
                shape_of[t] = tuple(int(d) for d in g.trace[g.key(rec, t) + "|shape"])
        if rec["type"] == "PriorBox":
            impl = lookup("PriorBox")(g.net.layer(rec["name"]))
            out = impl.forward([np.zeros(shape_of[b], F32) for b in rec["bottoms"]], [])[0]
            compare_sampled(out, g, g.key(rec, rec["tops"][0]), UNIT_TOL, rec["name"])
            checked += 1
    assert checked >= 4


# -- helpers ----------------------------------------------------------------------------------
def _net(tmp_path, body: str, inputs: dict[str, tuple[int, ...]]):
    return caffe_net(tmp_path, body, inputs)


def _priorbox(tmp_path, params: str, feat=(1, 4, 3, 5), img=(1, 3, 30, 50), bottoms=2):
    bots = ' bottom: "feat" bottom: "img"' if bottoms == 2 else ' bottom: "feat"'
    body = f'layer {{ name: "pb" type: "PriorBox"{bots} top: "pb" prior_box_param {{ {params} }} }}'
    return _net(tmp_path, body, {"feat": feat, "img": img})


def _detout(tmp_path, params: str, n_prior=6, n_cls=3, loc_cls=1, batch=1, extra=""):
    body = ('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
            f'bottom: "prior" top: "det" detection_output_param {{ {params} }} {extra} }}')
    return _net(tmp_path, body, {"loc": (batch, n_prior * loc_cls * 4),
                                 "conf": (batch, n_prior * n_cls),
                                 "prior": (1, 2, n_prior * 4)})


def _impl(net, name):
    return make_plan(net).layers[[lay.name for lay in net.layers].index(name)].impl


# -- PriorBox semantics -----------------------------------------------------------------------
def test_priorbox_layout_truncation_and_defaults(tmp_path):
    # min 10.7 acts as 10 and max 20.9 as 20; no variance means 0.1 everywhere.
    net = _priorbox(tmp_path, "min_size: 10.7 max_size: 20.9 aspect_ratio: 2 "
                    "aspect_ratio: 2.0000001")
    plan = make_plan(net)
    assert plan.layers[1].top_shapes == [(1, 2, 3 * 5 * 4 * 4)]  # ratios [1, 2, 1/2] + max
    out = plan.layers[1].impl.forward([np.zeros((1, 4, 3, 5), F32), np.zeros((1, 3, 30, 50), F32)],
                                      [])[0]
    assert out.dtype == F32 and out.shape == (1, 2, 240)
    box = out[0, 0].reshape(3, 5, 4, 4).astype(np.float64)
    # location (h=1, w=2): step 10 x 10, centre (25, 15); image 50 wide, 30 high
    cx, cy = 25.0, 15.0
    sides = [(10, 10), (np.sqrt(200), np.sqrt(200)), (10 * np.sqrt(2), 10 / np.sqrt(2)),
             (10 / np.sqrt(2), 10 * np.sqrt(2))]
    want = [[(cx - w / 2) / 50, (cy - h / 2) / 30, (cx + w / 2) / 50, (cy + h / 2) / 30]
            for w, h in sides]
    np.testing.assert_allclose(box[1, 2], want, rtol=1e-6)
    assert (out[0, 1] == F32(0.1)).all()
    assert box.min() < 0  # not clipped by default (OpenCV clips by default; the fork doesn't)


def test_priorbox_img_size_and_step_params(tmp_path):
    net = _priorbox(tmp_path, "min_size: 4 img_h: 40 img_w: 20 step_h: 6 step_w: 3 offset: 0 "
                    "variance: 1 variance: 2 variance: 3 variance: 4", bottoms=1)
    out = _impl(net, "pb").forward([np.zeros((2, 4, 3, 5), F32)], [])[0]
    box = out[0, 0].reshape(3, 5, 4)
    np.testing.assert_allclose(box[2, 4], [(12 - 2) / 20, (12 - 2) / 40, 14 / 20, 14 / 40],
                               rtol=1e-6)
    assert (out[0, 1].reshape(-1, 4) == [1, 2, 3, 4]).all()
    # img_size for both sides; step from the image over the feature size (float division)
    net = _priorbox(tmp_path, "min_size: 4 img_size: 33 clip: true")
    box = _impl(net, "pb").forward([np.zeros((1, 4, 3, 5), F32), None], [])[0][0, 0]
    step_w = F32(33) / F32(5)
    cx = float((F32(4) + F32(0.5)) * step_w)
    np.testing.assert_allclose(box.reshape(3, 5, 4)[0, 4, 2], min(1.0, (cx + 2) / 33), rtol=1e-6)
    assert box.min() >= 0 and box.max() <= 1


def test_priorbox_float64(tmp_path):
    net = _priorbox(tmp_path, "min_size: 7 max_size: 15 aspect_ratio: 3 step: 9.5")
    impl = _impl(net, "pb")
    f32 = impl.forward([np.zeros((1, 4, 3, 5), F32), np.zeros((1, 3, 30, 50), F32)], [])[0]
    f64 = impl.forward([np.zeros((1, 4, 3, 5)), np.zeros((1, 3, 30, 50))], [])[0]
    assert f64.dtype == np.float64
    np.testing.assert_allclose(f64, f32, rtol=0, atol=1e-7)
    assert (f64 != f32.astype(np.float64)).any()  # computed, not cast from float32


@pytest.mark.parametrize("params, err", [
    ("aspect_ratio: 2", UnsupportedError),                      # no min_size
    ("min_size: 0", UnsupportedError),
    ("min_size: 4 min_size: 8 max_size: 9", UnsupportedError),  # count mismatch
    ("min_size: 8 max_size: 8", UnsupportedError),              # max must exceed min
    ("min_size: 4 variance: 0.1 variance: 0.2", UnsupportedError),
    ("min_size: 4 variance: -0.1", UnsupportedError),
    ("min_size: 4 step: 2 step_h: 2 step_w: 2", UnsupportedError),
    ("min_size: 4 step_h: 2", UnsupportedError),                # step_w then 0: CHECK fails
    ("min_size: 4 img_size: 9 img_h: 9 img_w: 9", UnsupportedError),
    ("min_size: 4 img_w: 9", UnsupportedError),
])
def test_priorbox_rejects(tmp_path, params, err):
    with pytest.raises(err):
        make_plan(_priorbox(tmp_path, params))


def test_priorbox_needs_image_bottom(tmp_path):
    with pytest.raises(ModelFormatError):
        make_plan(_priorbox(tmp_path, "min_size: 4", bottoms=1))
    make_plan(_priorbox(tmp_path, "min_size: 4 img_size: 30", bottoms=1))


# -- a literal transcription of the fork's detection code (reference for the tests) ---------
def _ref_detection(loc, conf, prior, nc, share=True, bg=0, code="CORNER", vit=False,
                   thr=None, nms=0.3, eta=1.0, top_k=-1, keep_top_k=-1):
    nms, eta = F32(nms), F32(eta)
    n = loc.shape[0]
    p = prior.shape[2] // 4
    nl = 1 if share else nc
    loc = loc.reshape(n, p, nl, 4)
    conf = conf.reshape(n, p, nc)
    pb, pv = prior[0, 0].reshape(p, 4), prior[0, 1].reshape(p, 4)
    thr = F32(-3.4028235e38) if thr is None else F32(thr)

    def decode(pr, v, lc):
        v = [F32(1)] * 4 if vit else v
        if code == "CORNER":
            return [pr[k] + v[k] * lc[k] for k in range(4)]
        pw, ph = pr[2] - pr[0], pr[3] - pr[1]
        if code == "CORNER_SIZE":
            return [pr[0] + v[0] * lc[0] * pw, pr[1] + v[1] * lc[1] * ph,
                    pr[2] + v[2] * lc[2] * pw, pr[3] + v[3] * lc[3] * ph]
        cx, cy = v[0] * lc[0] * pw + (pr[0] + pr[2]) / 2, v[1] * lc[1] * ph + (pr[1] + pr[3]) / 2
        w, h = np.exp(v[2] * lc[2]) * pw, np.exp(v[3] * lc[3]) * ph
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    def size(b):
        return F32(0) if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])

    def iou(a, b):
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return F32(0)
        iw = min(a[2], b[2]) - max(a[0], b[0])
        ih = min(a[3], b[3]) - max(a[1], b[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            return inter / (size(a) + size(b) - inter)
        return F32(0)

    rows = []
    for i in range(n):
        boxes = {lab: [decode(pb[j], pv[j], loc[i, j, lab]) for j in range(p)] for lab in range(nl)}
        picked = {}
        for c in range(nc):
            if c == bg:
                continue
            bx = boxes[0 if share else c]
            cand = sorted([(conf[i, j, c], j) for j in range(p) if conf[i, j, c] > thr],
                          key=lambda t: -t[0])  # Python's sort is stable
            if top_k > -1:
                cand = cand[:top_k]
            kept, t = [], nms
            for _, j in cand:
                ok = all(iou(bx[j], bx[k]) <= t for k in kept)
                if ok:
                    kept.append(j)
                    if eta < 1 and t > 0.5:
                        t = F32(t * eta)
            picked[c] = kept
        if keep_top_k > -1 and sum(map(len, picked.values())) > keep_top_k:
            pool = sorted([(conf[i, j, c], c, j) for c in picked for j in picked[c]],
                          key=lambda t: -t[0])[:keep_top_k]
            picked = {}
            for _, c, j in pool:
                picked.setdefault(c, []).append(j)
        for c in sorted(picked):
            for j in picked[c]:
                rows.append([i, c, conf[i, j, c], *boxes[0 if share else c][j]])
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(n)], F32)[None, None]
    return np.array(rows, F32)[None, None]


def _random_inputs(rng, n, p, nc, nl, grid=True):
    # priors on a grid of overlapping squares, so NMS has work to do
    if grid:
        cx = (np.arange(p) % 4 + 0.5) / 4
        cy = (np.arange(p) // 4 % 4 + 0.5) / 4
        s = 0.3 + 0.2 * (np.arange(p) % 3)
        pb = np.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], 1)
    else:
        pb = rng.uniform(0, 0.5, (p, 2))
        pb = np.concatenate([pb, pb + rng.uniform(0.1, 0.5, (p, 2))], 1)
    var = np.tile([0.1, 0.1, 0.2, 0.2], (p, 1))
    prior = np.stack([pb.reshape(-1), var.reshape(-1)])[None].astype(F32)
    loc = rng.normal(0, 1, (n, p * nl * 4)).astype(F32)
    logits = rng.normal(0, 2, (n, p, nc))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return loc, conf.reshape(n, -1).astype(F32), prior


CASES = {
    "center_size": ("code_type: CENTER_SIZE keep_top_k: 10 confidence_threshold: 0.1 "
                    "nms_param { nms_threshold: 0.45 }",
                    dict(code="CENTER_SIZE", keep_top_k=10, thr=0.1, nms=F32(0.45))),
    "corner_eta": ("code_type: CORNER confidence_threshold: 0.05 "
                   "nms_param { nms_threshold: 0.9 eta: 0.7 top_k: 20 }",
                   dict(code="CORNER", thr=0.05, nms=F32(0.9), eta=F32(0.7), top_k=20)),
    "corner_size_vit": ("code_type: CORNER_SIZE variance_encoded_in_target: true "
                        "nms_param { nms_threshold: 0.5 } keep_top_k: 4",
                        dict(code="CORNER_SIZE", vit=True, nms=F32(0.5), keep_top_k=4)),
    "no_threshold_bg2": ("code_type: CENTER_SIZE background_label_id: 2 "
                         "nms_param { nms_threshold: 0.2 top_k: 5 }",
                         dict(code="CENTER_SIZE", bg=2, nms=F32(0.2), top_k=5)),
    "per_class_loc": ("share_location: false code_type: CENTER_SIZE background_label_id: -1 "
                      "confidence_threshold: 0.2 keep_top_k: 12 nms_param { nms_threshold: 0.4 }",
                      dict(share=False, code="CENTER_SIZE", bg=-1, thr=0.2, nms=F32(0.4),
                           keep_top_k=12)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_detection_output_matches_reference(tmp_path, name, batch):
    params, kw = CASES[name]
    nc, p = 4, 32
    share = kw.get("share", True)
    rng = np.random.RandomState(len(name) * 7 + batch)
    loc, conf, prior = _random_inputs(rng, batch, p, nc, 1 if share else nc,
                                      grid=name != "corner_size_vit")
    net = _detout(tmp_path, f"num_classes: {nc} {params}", n_prior=p, n_cls=nc,
                  loc_cls=1 if share else nc, batch=batch)
    for a in (loc, conf, prior):
        a.flags.writeable = False
    got = _impl(net, "det").forward([loc, conf, prior], [])[0]
    want = _ref_detection(loc, conf, prior, nc, **kw)
    assert got.dtype == F32
    np.testing.assert_array_equal(got[..., :3], want[..., :3])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
    assert 1 < got.shape[2]
    # end to end through the runner, whose plan only knows Caffe's [1, 1, 1, 7] placeholder
    trace = run_caffe(net, {"loc": loc, "conf": conf, "prior": prior})
    np.testing.assert_array_equal(trace["det"].outputs[0], got)


def _boxes_net(tmp_path, params, boxes, scores, batch=1):
    """CORNER decode with zero offsets returns the priors themselves as detections."""
    p = len(boxes)
    prior = np.stack([np.asarray(boxes, F32).reshape(-1), np.full(p * 4, 0.1, F32)])[None]
    conf = np.zeros((batch, p, 2), F32)
    conf[:, :, 1] = scores
    conf[:, :, 0] = 1 - conf[:, :, 1]
    net = _detout(tmp_path, f"num_classes: 2 code_type: CORNER {params}", n_prior=p, n_cls=2,
                  batch=batch)
    return _impl(net, "det").forward([np.zeros((batch, p * 4), F32), conf.reshape(batch, -1),
                                      prior], [])[0]


A, B, C = [0, 0, 1, 1], [0, 0, 0.5, 1], [0.5, 0, 1, 1]  # IoU(A, B) = IoU(A, C) = 0.5 exactly


def test_nms_keeps_iou_equal_to_threshold(tmp_path):
    out = _boxes_net(tmp_path, "nms_param { nms_threshold: 0.5 }", [A, B], [0.9, 0.8])
    assert out.shape == (1, 1, 2, 7)
    out = _boxes_net(tmp_path, "nms_param { nms_threshold: 0.49 }", [A, B], [0.9, 0.8])
    assert out.shape == (1, 1, 1, 7) and out[0, 0, 0, 2] == F32(0.9)


def test_nms_eta_lowers_threshold_after_a_keep(tmp_path):
    # threshold 0.6 keeps B against A; eta 0.5 drops it to 0.3 once A is kept
    out = _boxes_net(tmp_path, "nms_param { nms_threshold: 0.6 }", [A, B, C], [0.9, 0.8, 0.7])
    assert out.shape[2] == 3
    out = _boxes_net(tmp_path, "nms_param { nms_threshold: 0.6 eta: 0.5 }", [A, B, C],
                     [0.9, 0.8, 0.7])
    assert out.shape[2] == 1


def test_threshold_is_strict(tmp_path):
    far = [[0, 0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]]
    out = _boxes_net(tmp_path, "confidence_threshold: 0.5", far, [0.5, 0.75])
    assert out.shape == (1, 1, 1, 7)  # 0.5 is not > 0.5
    np.testing.assert_array_equal(out[0, 0, 0], np.array([0, 1, 0.75, 0.5, 0.5, 0.6, 0.6], F32))


def test_ties_keep_prior_order(tmp_path):
    # 40 disjoint boxes, three distinct scores: the fork's stable_sort orders ties by prior
    xy = np.stack([np.arange(40) % 8, np.arange(40) // 8], 1) / 8
    boxes = np.concatenate([xy, xy + 0.05], 1)
    scores = np.random.RandomState(0).choice(np.array([0.7, 0.75, 0.8], F32), 40)
    out = _boxes_net(tmp_path, "nms_param { top_k: 30 }", boxes, scores)
    order = sorted(range(40), key=lambda j: -scores[j])[:30]  # Python's sort is stable
    np.testing.assert_array_equal(out[0, 0, :, 3:5], boxes[order, :2].astype(F32))


def test_keep_top_k_regroups_by_label(tmp_path):
    nc, p = 3, 3
    prior = np.stack([np.array([[0, 0, .1, .1], [.3, .3, .4, .4], [.6, .6, .7, .7]],
                               F32).reshape(-1), np.full(12, 0.1, F32)])[None]
    conf = np.array([[0, .3, .7], [0, .9, .1], [0, .6, .4]], F32).reshape(1, -1)
    net = _detout(tmp_path, "num_classes: 3 code_type: CORNER keep_top_k: 3", n_prior=p, n_cls=nc)
    out = _impl(net, "det").forward([np.zeros((1, 12), F32), conf, prior], [])[0]
    # top 3 scores are .9 (label 1), .7 (label 2), .6 (label 1): label 1 first, by score
    np.testing.assert_array_equal(out[0, 0, :, 1:3], np.array([[1, .9], [1, .6], [2, .7]], F32))


def test_no_detection_rows(tmp_path):
    out = _boxes_net(tmp_path, "confidence_threshold: 0.95", [A, B], [0.9, 0.8], batch=2)
    np.testing.assert_array_equal(out, [[[[0] + [-1] * 6, [1] + [-1] * 6]]])
    out = _boxes_net(tmp_path, "keep_top_k: 0", [A, B], [0.9, 0.8])
    np.testing.assert_array_equal(out, [[[[0] + [-1] * 6]]])


def test_decoded_boxes_not_clipped(tmp_path):
    p = 1
    prior = np.array([[[0.1, 0.1, 0.3, 0.3], [1, 1, 1, 1]]], F32)
    net = _detout(tmp_path, "num_classes: 2 code_type: CORNER", n_prior=p, n_cls=2)
    out = _impl(net, "det").forward([np.array([[-1, -1, 2, 2]], F32),
                                     np.array([[0.2, 0.8]], F32), prior], [])[0]
    np.testing.assert_allclose(out[0, 0, 0, 3:], [-0.9, -0.9, 2.3, 2.3], rtol=1e-6)


def test_no_background_with_shared_location(tmp_path):
    # the fork's GPU path (its CPU path aborts): every class, 0 included, is foreground
    far = [[0, 0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]]
    out = _boxes_net(tmp_path, "background_label_id: -1 confidence_threshold: 0.3", far,
                     [0.4, 0.9])
    np.testing.assert_array_equal(out[0, 0, :, 1:3], np.array([[0, .6], [1, .9], [1, .4]], F32))


def test_detection_output_float64(tmp_path):
    params, kw = CASES["center_size"]
    rng = np.random.RandomState(5)
    loc, conf, prior = _random_inputs(rng, 2, 32, 4, 1)
    net = _detout(tmp_path, f"num_classes: 4 {params}", n_prior=32, n_cls=4, batch=2)
    impl = _impl(net, "det")
    f32 = impl.forward([loc, conf, prior], [])[0]
    f64 = impl.forward([a.astype(np.float64) for a in (loc, conf, prior)], [])[0]
    assert f64.dtype == np.float64 and f64.shape == f32.shape
    np.testing.assert_array_equal(f64[..., :3], f32[..., :3])
    np.testing.assert_allclose(f64, f32, rtol=0, atol=1e-6)


@pytest.mark.parametrize("params, err", [
    ("code_type: CORNER", UnsupportedError),                                 # no num_classes
    ("num_classes: 3 nms_param { eta: 1.5 }", UnsupportedError),
    ("num_classes: 3 nms_param { eta: 0 }", UnsupportedError),
    ("num_classes: 3 nms_param { nms_threshold: -0.1 }", UnsupportedError),
    ("num_classes: 4", ModelFormatError),                                    # conf size
    ("num_classes: 3 share_location: false", ModelFormatError),              # loc size
    ("num_classes: 3 visualize: true", UnsupportedError),                    # needs bottom[3]
])
def test_detection_output_rejects(tmp_path, params, err):
    with pytest.raises(err):
        make_plan(_detout(tmp_path, params))
    assert issubclass(err, LayerdiffError)


def test_detection_output_rejects_one_channel_prior(tmp_path):
    body = ('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
            'bottom: "prior" top: "det" detection_output_param { num_classes: 3 '
            'variance_encoded_in_target: true } }')
    net = _net(tmp_path, body, {"loc": (1, 24), "conf": (1, 18), "prior": (1, 1, 24)})
    with pytest.raises(ModelFormatError):
        make_plan(net)


def test_detection_output_rejects_degenerate_prior_for_size_codes(tmp_path):
    prior = np.stack([np.array([0.2, 0.2, 0.2, 0.4], F32), np.full(4, 0.1, F32)])[None]
    net = _detout(tmp_path, "num_classes: 2 code_type: CENTER_SIZE", n_prior=1, n_cls=2)
    with pytest.raises(ModelFormatError, match="non-positive width"):
        _impl(net, "det").forward([np.zeros((1, 4), F32), np.array([[0.5, 0.5]], F32), prior], [])


def test_shared_data_present():
    require_shared()
