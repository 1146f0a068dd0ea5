"""SSD detection layers (weiliu89/caffe branch ``ssd``): PriorBox and DetectionOutput.

Semantics follow the fork's ``prior_box_layer.cpp``, ``detection_output_layer.cpp`` and
``util/bbox_util.cpp`` (see ``shared/golden/FORK_LAYERS.md``), not OpenCV's re-implementation.
"""

from __future__ import annotations

import math

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register

FLT_MAX = float(np.finfo(np.float32).max)


def _legacy_dim(shape: Shape, index: int) -> int:
    """Blob::LegacyShape: axes past the end read as 1 (the fork reads H/W this way)."""
    return int(shape[index]) if index < len(shape) else 1


@register("PriorBox")
class PriorBox(LayerImpl):
    """Default boxes of one feature map: top [1, 2, H*W*num_priors*4] (boxes, then variances)."""

    # The fork declares ``ExactBottomBlobs`` (a misspelt override Caffe never calls), so the
    # count is unchecked; bottom[1] is only read when no image size is given.
    num_bottoms = (1, None)

    def setup(self) -> None:
        p = self.param.prior_box_param
        if len(p.min_size) == 0:
            raise self.unsupported("min_size", "must provide min_size")
        if any(not m > 0 for m in p.min_size):
            raise self.unsupported("min_size", "every min_size must be positive")
        # The fork keeps the float sizes but assigns them to an int before use (truncation).
        self.min_sizes = [int(m) for m in p.min_size]
        self.max_sizes: list[int] = []
        if len(p.max_size) > 0:
            if len(p.max_size) != len(p.min_size):
                raise self.unsupported("max_size", f"{len(p.max_size)} max_size(s) for "
                                       f"{len(p.min_size)} min_size(s); counts must match")
            for lo, hi in zip(p.min_size, p.max_size, strict=True):
                if not hi > lo:
                    raise self.unsupported("max_size", f"max_size {hi} must exceed min_size {lo}")
            self.max_sizes = [int(m) for m in p.max_size]
        # Ratio list: 1 first, then each new ratio (1e-6 dedupe) and, with flip, its reciprocal.
        ratios = [np.float32(1.0)]
        for r in p.aspect_ratio:
            r = np.float32(r)
            if any(abs(float(r) - float(a)) < 1e-6 for a in ratios):
                continue
            ratios.append(r)
            if p.flip:
                with np.errstate(divide="ignore"):
                    ratios.append(np.float32(1.0 / np.float64(r)))
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        # Forward emits the square box(es), then every ratio not within 1e-6 of 1.
        self.box_ratios = [float(r) for r in ratios if not abs(float(r) - 1.0) < 1e-6]
        if len(self.box_ratios) != len(ratios) - 1:
            raise self.unsupported("aspect_ratio", "a flipped ratio within 1e-6 of 1 leaves part "
                                   "of Caffe's top uninitialized")
        self.clip = p.clip
        var = list(p.variance)
        if len(var) not in (0, 1, 4):
            raise self.unsupported("variance", f"{len(var)} values; give 1 or 4 (or none)")
        if any(not v > 0 for v in var):
            raise self.unsupported("variance", "every variance must be positive")
        self.variance = var or [float(np.float32(0.1))]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.unsupported("img_size", "give either img_size or img_h/img_w, not both")
            if p.img_h <= 0 or p.img_w <= 0:
                raise self.unsupported("img_h", "img_h and img_w must both be set and positive")
            self.img_hw = (p.img_h, p.img_w)
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.unsupported("img_size", "must be positive")
            self.img_hw = (p.img_size, p.img_size)
        else:
            self.img_hw = None
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.unsupported("step", "give either step or step_h/step_w, not both")
            if not (p.step_h > 0 and p.step_w > 0):
                raise self.unsupported("step_h", "step_h and step_w must both be set and positive")
            self.step_hw = (np.float32(p.step_h), np.float32(p.step_w))
        elif p.HasField("step"):
            if not p.step > 0:
                raise self.unsupported("step", "must be positive")
            self.step_hw = (np.float32(p.step), np.float32(p.step))
        else:
            self.step_hw = None
        self.offset = np.float32(p.offset)
        if self.img_hw is None and len(self.layer.bottoms) < 2:
            raise self.invalid("needs the image blob as bottom[1] when img_size/img_h/img_w "
                               "are not given")

    def _feature_hw(self, shape: Shape) -> tuple[int, int]:
        if len(shape) > 4:
            raise self.invalid(f"bottom of {len(shape)} axes: PriorBox reads legacy H/W (<= 4)")
        return _legacy_dim(shape, 2), _legacy_dim(shape, 3)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        h, w = self._feature_hw(bottom_shapes[0])
        if self.img_hw is None:
            self._feature_hw(bottom_shapes[1])
        n = h * w * self.num_priors * 4
        if n <= 0:
            raise self.invalid(f"empty prior blob for a {h}x{w} feature map")
        return [(1, 2, n)]

    def _box_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(width, height) of each prior at one location, as the fork's float variables."""
        ws: list[float] = []
        hs: list[float] = []
        for s, mn in enumerate(self.min_sizes):
            ws.append(mn)
            hs.append(mn)
            if self.max_sizes:
                side = math.sqrt(mn * self.max_sizes[s])
                ws.append(side)
                hs.append(side)
            for r in self.box_ratios:
                with np.errstate(invalid="ignore", divide="ignore"):
                    sr = np.sqrt(np.float64(r))
                    ws.append(mn * sr)
                    hs.append(mn / sr)
        return np.array(ws, np.float32), np.array(hs, np.float32)

    def forward(self, bottoms, blobs):
        dtype = bottoms[0].dtype
        h, w = self._feature_hw(bottoms[0].shape)
        img_h, img_w = self.img_hw or self._feature_hw(bottoms[1].shape)
        if self.step_hw is not None:
            step_h, step_w = self.step_hw
        else:  # float division of the image by the feature size
            step_h = np.float32(img_h) / np.float32(h)
            step_w = np.float32(img_w) / np.float32(w)
        # Centres in float32 whatever the Dtype: the fork's centre variables are float.
        cy = ((np.arange(h, dtype=np.float32) + self.offset) * step_h).astype(np.float64)
        cx = ((np.arange(w, dtype=np.float32) + self.offset) * step_w).astype(np.float64)
        bw, bh = (a.astype(np.float64) / 2.0 for a in self._box_sizes())
        k = len(bw)
        box = np.empty((h, w, k, 4), np.float64)
        # Coordinates in double, divided by the integer image size, then stored in Dtype.
        box[..., 0] = (cx[None, :, None] - bw) / img_w
        box[..., 1] = (cy[:, None, None] - bh) / img_h
        box[..., 2] = (cx[None, :, None] + bw) / img_w
        box[..., 3] = (cy[:, None, None] + bh) / img_h
        coords = box.astype(dtype).reshape(-1)
        if self.clip:
            coords = np.clip(coords, 0, 1)
        var = np.array(self.variance, np.float32).astype(dtype)
        variances = np.broadcast_to(var, (coords.size // len(var), len(var))).reshape(-1)
        return [np.stack([coords, variances])[None]]


@register("DetectionOutput")
class DetectionOutput(LayerImpl):
    """Decode SSD box predictions, per-class NMS, keep_top_k: top [1, 1, K, 7].

    K is only known after the forward pass (Caffe's Reshape sets a placeholder [1, 1, 1, 7]);
    :attr:`dynamic_shape` tells the runner not to hold the output to :meth:`top_shapes`.
    """

    # bottom[3] is only the image for the fork's visualization, which never changes the top.
    num_bottoms = (3, 4)
    dynamic_shape = True

    CODE_TYPES = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}

    def setup(self) -> None:
        p = self.param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.unsupported("num_classes", "must be specified")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        # background_label_id -1 with share_location: the fork's CPU path aborts ("Could not
        # find location predictions for label -1": it skips decoding the shared label -1 as if
        # it were the background), its GPU path runs every class as foreground. We follow the
        # GPU path, the only one that gives an answer.
        if p.code_type not in self.CODE_TYPES:
            raise self.unsupported("code_type", f"unknown code type {p.code_type}")
        self.code_type = self.CODE_TYPES[p.code_type]
        self.variance_in_target = p.variance_encoded_in_target
        self.keep_top_k = int(p.keep_top_k)
        # Unset means every score is a candidate: the fork uses -FLT_MAX and a strict '>'.
        self.conf_threshold = np.float32(p.confidence_threshold if
                                         p.HasField("confidence_threshold") else -FLT_MAX)
        nms = p.nms_param
        self.nms_threshold = np.float32(nms.nms_threshold)
        if not self.nms_threshold >= 0:
            raise self.unsupported("nms_param.nms_threshold", "must be non-negative")
        self.eta = np.float32(nms.eta)
        if not 0 < self.eta <= 1:
            raise self.unsupported("nms_param.eta", f"{nms.eta} not in (0, 1]")
        self.top_k = int(nms.top_k) if nms.HasField("top_k") else -1
        if p.visualize and len(self.layer.bottoms) < 4:
            raise self.unsupported("visualize", "needs the image as bottom[3]")

    def _num_priors(self, bottom_shapes: list[Shape]) -> int:
        loc, conf, prior = bottom_shapes[:3]
        if any(len(s) > 4 for s in (loc, conf, prior)):
            raise self.invalid("DetectionOutput reads legacy N/C/H (bottoms of at most 4 axes)")
        n_prior = _legacy_dim(prior, 2) // 4
        if _legacy_dim(loc, 0) != _legacy_dim(conf, 0):
            raise self.invalid(f"loc batch {loc[0]} != conf batch {conf[0]}")
        want_loc = n_prior * self.num_loc_classes * 4
        if _legacy_dim(loc, 1) != want_loc or int(np.prod(loc[1:])) != want_loc:
            raise self.invalid(f"loc shape {list(loc)} does not match {n_prior} priors "
                               f"x {self.num_loc_classes} location class(es) x 4")
        want_conf = n_prior * self.num_classes
        if _legacy_dim(conf, 1) != want_conf or int(np.prod(conf[1:])) != want_conf:
            raise self.invalid(f"conf shape {list(conf)} does not match {n_prior} priors "
                               f"x {self.num_classes} classes")
        if int(np.prod(prior)) < 2 * n_prior * 4:
            raise self.invalid(f"prior shape {list(prior)}: the fork reads boxes and variances "
                               "(2 channels of priors x 4)")
        return n_prior

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._num_priors(bottom_shapes)
        return [(1, 1, 1, 7)]  # Caffe's placeholder; the real K is data-dependent

    def _decode(self, loc: np.ndarray, prior: np.ndarray, var: np.ndarray) -> np.ndarray:
        """Boxes from (n, P, L, 4) offsets, with float ops in bbox_util.cpp's order."""
        px1, py1, px2, py2 = (prior[:, None, i] for i in range(4))
        v = [var[:, None, i] for i in range(4)]
        lx1, ly1, lx2, ly2 = (loc[..., i] for i in range(4))
        if self.variance_in_target:
            v = [1, 1, 1, 1]
        if self.code_type == "CORNER":
            return np.stack([px1 + v[0] * lx1, py1 + v[1] * ly1,
                             px2 + v[2] * lx2, py2 + v[3] * ly2], axis=-1)
        pw, ph = px2 - px1, py2 - py1
        if not (np.all(pw > 0) and np.all(ph > 0)):
            raise self.invalid(f"a prior box has non-positive width or height; the fork's "
                               f"{self.code_type} decode aborts (CHECK_GT)")
        if self.code_type == "CORNER_SIZE":
            return np.stack([px1 + v[0] * lx1 * pw, py1 + v[1] * ly1 * ph,
                             px2 + v[2] * lx2 * pw, py2 + v[3] * ly2 * ph], axis=-1)
        pcx, pcy = (px1 + px2) / 2, (py1 + py2) / 2
        cx = v[0] * lx1 * pw + pcx
        cy = v[1] * ly1 * ph + pcy
        with np.errstate(over="ignore"):
            hw = np.exp(v[2] * lx2) * pw / 2
            hh = np.exp(v[3] * ly2) * ph / 2
        return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1)

    def _nms(self, boxes: np.ndarray, sizes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """ApplyNMSFast: indices kept for one class, in descending-score order."""
        cand = np.flatnonzero(scores > self.conf_threshold)
        cand = cand[np.argsort(-scores[cand], kind="stable")]  # stable_sort, ties by index
        if self.top_k > -1:
            cand = cand[:self.top_k]
        b, s = boxes[cand], sizes[cand]
        # max IoU of each candidate with the boxes kept so far; between two keeps the
        # threshold is constant, so the next keep is the first candidate within it.
        worst = np.zeros(len(cand), boxes.dtype)
        thr = self.nms_threshold
        kept = []
        pos = 0
        while pos < len(cand):
            ok = np.flatnonzero(worst[pos:] <= thr)
            if not ok.size:
                break
            j = pos + int(ok[0])
            kept.append(j)
            pos = j + 1
            rest = slice(pos, None)
            iw = np.minimum(b[j, 2], b[rest, 2]) - np.maximum(b[j, 0], b[rest, 0])
            ih = np.minimum(b[j, 3], b[rest, 3]) - np.maximum(b[j, 1], b[rest, 1])
            hit = (iw > 0) & (ih > 0)
            inter = iw * ih
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.where(hit, inter / (s[j] + s[rest] - inter), 0)
            worst[rest] = np.maximum(worst[rest], iou)
            if self.eta < 1 and thr > 0.5:
                thr = np.float32(thr * self.eta)
        return cand[kept]

    def forward(self, bottoms, blobs):
        loc, conf, prior = bottoms[:3]
        dtype = loc.dtype
        n = loc.shape[0]
        n_prior = self._num_priors([b.shape for b in bottoms])
        nl, nc = self.num_loc_classes, self.num_classes
        flat_prior = prior.reshape(-1).astype(dtype, copy=False)
        boxes = self._decode(loc.reshape(n, n_prior, nl, 4),
                             flat_prior[:n_prior * 4].reshape(n_prior, 4),
                             flat_prior[n_prior * 4:n_prior * 8].reshape(n_prior, 4))
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        # BBoxSize gives an inverted box area 0, but such a box never intersects, so w*h serves.
        sizes = w * h
        scores = conf.reshape(n, n_prior, nc)
        rows = []
        for i in range(n):
            labels, idx = [], []
            for c in range(nc):
                if c == self.background:
                    continue
                lc = 0 if self.share_location else c
                keep = self._nms(boxes[i, :, lc], sizes[i, :, lc], scores[i, :, c])
                labels.append(np.full(len(keep), c))
                idx.append(keep)
            lab = np.concatenate(labels) if labels else np.zeros(0, int)
            pid = np.concatenate(idx) if idx else np.zeros(0, int)
            if -1 < self.keep_top_k < len(lab):
                # The fork uses std::sort here (ties unordered); a stable sort is our choice.
                top = np.argsort(-scores[i, pid, lab], kind="stable")[:self.keep_top_k]
                top = top[np.argsort(lab[top], kind="stable")]  # regrouped by label
                lab, pid = lab[top], pid[top]
            loc_lab = np.zeros_like(lab) if self.share_location else lab
            det = np.empty((len(lab), 7), dtype)
            det[:, 0] = i
            det[:, 1] = lab
            det[:, 2] = scores[i, pid, lab]
            det[:, 3:] = boxes[i, pid, loc_lab]
            rows.append(det)
        out = np.concatenate(rows)
        if not len(out):  # the fork's "no detections" rows: [i, -1, -1, -1, -1, -1, -1]
            out = np.full((n, 7), -1, dtype)
            out[:, 0] = np.arange(n)
        return [out[None, None]]
