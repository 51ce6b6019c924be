"""Make the committed mmdetection 3.3 reference outputs ``tests/reference/mmdet/<model>.pt``.

Run by hand (never by the tests) from the project checkout, with the OpenMMLab packages side-installed
by ``../shared/tools/mmdet-reference/setup.sh``::

    PYTHONPATH=/tmp/mm-site OMP_NUM_THREADS=1 .venv/bin/python tests/reference/mmdet/make_reference.py \
        [--models retinanet_pvtv2_b0 ...] [--seed 0] [--work /tmp/mmdet-ref-work] [--no-determinism-check]
    ... make_reference.py --calibrate MODEL   # print the LAST_LAYERS weight stds for weights.py
    ... make_reference.py --samples           # (re)write mmengine_meta_sample.pth / mmengine_runner_sample.pth

For each model it
1. draws the state dict with ``weights.make_state_dict(model, seed)`` (torch only; the tests redraw it)
   and checks its keys and shapes against the model that mmdetection builds from its own config;
2. saves it as an mmengine checkpoint ``{'meta': ..., 'state_dict': ...}`` with
   ``mmengine.runner.checkpoint.save_checkpoint`` (as the harness's ``make`` does) under ``--work``;
3. runs the harness's ``mmdet_ref.py --threads 1 infer`` (mmdetection's own ``init_detector`` +
   ``inference_detector``, identity test pipeline, which asserts that the packed input equals the image)
   on the PNGs of ``images.make_images(seed)``, twice, and checks that both runs give bit-identical
   raw outputs and detections;
4. writes ``<model>.pt`` (plain tensors, dicts, lists, strs; loads with ``torch.load(weights_only=True)``):

   top level: ``format`` (1), ``model``, ``seed``, ``weights_sha256`` (``weights.state_dict_digest``),
   ``image_sha256`` (list), ``image_sizes``, ``mmdet_version``, ``torch_version``, ``torch_threads`` (1),
   ``test_cfg`` (mmdet's, from dets.json), ``kind`` ("RetinaNet" | "MaskRCNN"), ``stats``, ``images``
   (one dict per test image, in ``images.SIZES`` order):

   * ``name``, ``height``, ``width``, ``time_s``; detections in mmdet's order (score descending):
     ``boxes`` f32 [N,4] (x1,y1,x2,y2 px), ``scores`` f32 [N], ``labels`` i64 [N] (0..79);
   * RetinaNet: ``cls_logits`` / ``bbox_deltas``: dict ``shapes`` (per level [C,H,W]: [720,H,W] /
     [36,H,W], channel = anchor*80 + class / anchor*4 + k), ``index`` (per level i64 [K], sorted flat
     indices into that level's [C,H,W] tensor: seeded random ones plus the level's top-200 logits),
     ``values`` (per level f32 [K]); ``anchors``: ``count`` (per level), ``index`` (per level i64:
     the first 50 rows and 50 seeded random rows), ``values`` (per level f32 [100,4]);
   * Mask R-CNN: ``rpn_cls_logits`` / ``rpn_bbox_deltas`` (same layout, [3,H,W] / [12,H,W] per level
     P2-P6), ``proposals`` f32 [200,4] and ``proposal_scores`` f32 [200] (the first 200 of mmdet's
     ``num_proposals`` RPN outputs, sorted by score), ``num_proposals``, ``rcnn_cls_score`` f32 [50,81]
     (background last) and ``rcnn_bbox_pred`` f32 [50,320] for the first 50 RoIs (= first 50 proposals),
     ``mask_logits`` f32 [10,28,28] (the first 10 detections, channel of their label, before sigmoid),
     ``masks``: dict ``crop`` i32 [N,4] (y0, x0, h, w of the mask's tight pixel bounding box; h = w = 0
     for an empty mask), ``offsets`` i64 [N+1] and ``bits`` u8 (``numpy.packbits`` of each crop,
     C order, concatenated); unpack with ``tests/mmdet_reference.py:unpack_masks``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images as ref_images  # noqa: E402
import weights as ref_weights  # noqa: E402

HARNESS = Path(os.environ.get("MMDET_HARNESS", HERE.parents[3] / "shared/tools/mmdet-reference/harness"))
N_CLS_SAMPLE, N_BOX_SAMPLE, N_TOP = 2000, 500, 200
N_RPN_CLS_SAMPLE, N_RPN_BOX_SAMPLE = 1000, 300
N_ANCHOR_FIRST, N_ANCHOR_RANDOM = 50, 50
N_PROPOSALS, N_ROIS, N_MASK_LOGITS = 200, 50, 10
SAMPLE_SEED = 12345
CLAMPED_NORMAL_STD = 0.9594  # std of a standard normal clamped to [-2, 2] (weights.CLAMP)
TARGET_STD = {  # std of the weight part of each last layer's output (the harness's mmdet_ref.CALIB targets)
    "bbox_head.retina_cls": 1.0,
    "bbox_head.retina_reg": 0.5,
    "rpn_head.rpn_cls": 1.5,
    "rpn_head.rpn_reg": 0.3,
    "roi_head.bbox_head.fc_cls": 1.5,
    "roi_head.bbox_head.fc_reg": 1.0,
    "roi_head.mask_head.conv_logits": 2.0,
}
# except here: with the harness's retina_cls (1.0, bias -4) the 100 detections' scores bunch at ~0.5-0.7;
# a wider logit spread with a lower bias (weights.LAST_LAYERS) spreads them over ~0.1-0.9.
TARGET_STD_OVERRIDE = {
    ("retinanet_pvtv2_b0", "bbox_head.retina_cls"): 4.0,
    ("retinanet_pvt_s", "bbox_head.retina_cls"): 3.0,
    # Mask R-CNN: with the harness's values the scores sit at ~0.2-0.4 and most masks fill ~90% of their
    # box; these (and conv_logits bias mean -1 in weights.LAST_LAYERS) give ~0.2-0.6 and ~70-85%.
    ("mask_rcnn_pvtv2_b0", "roi_head.bbox_head.fc_cls"): 1.875,
    ("mask_rcnn_pvt_s", "roi_head.bbox_head.fc_cls"): 1.875,
    ("mask_rcnn_pvtv2_b0", "roi_head.mask_head.conv_logits"): 6.0,
    ("mask_rcnn_pvt_s", "roi_head.mask_head.conv_logits"): 6.0,
}
CALIB_STAGES = [  # a stage's inputs depend on the layers calibrated before it
    ["bbox_head.retina_cls", "bbox_head.retina_reg", "rpn_head.rpn_cls", "rpn_head.rpn_reg"],
    ["roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg"],
    ["roi_head.mask_head.conv_logits"],
]


def _harness() -> Any:
    """Import the harness (its mm_shim first), which needs PYTHONPATH=/tmp/mm-site."""
    if not (HARNESS / "mmdet_ref.py").is_file():
        raise FileNotFoundError(f"{HARNESS}/mmdet_ref.py not found; set MMDET_HARNESS to the harness folder")
    sys.path.insert(0, str(HARNESS))
    import mmdet_ref

    return mmdet_ref


def build_mmdet_model(model: str, max_per_img: int | None = None) -> tuple[Any, Any]:
    """mmdetection's own model for ``model`` (from the harness's config table), eval mode; optionally
    with another final ``max_per_img``."""
    h = _harness()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = h.build_cfg(model)
    if max_per_img is not None:
        tc = cfg.model.test_cfg
        (tc.rcnn if "rcnn" in tc else tc).max_per_img = max_per_img
    net = MODELS.build(cfg.model)
    net.eval()
    return net, cfg


def check_keys(net: Any, sd: dict[str, torch.Tensor], model: str) -> None:
    """Our key list must be exactly mmdet's state dict (names and shapes): init_detector loads non-strictly."""
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in sd.items()}
    if theirs != ours:
        raise SystemExit(
            f"keys/{model}.txt differs from mmdet's state dict: missing {sorted(set(theirs) - set(ours))[:5]}, "
            f"extra {sorted(set(ours) - set(theirs))[:5]}, "
            f"shape {[k for k in ours if k in theirs and ours[k] != theirs[k]][:5]}"
        )


def write_images(out: Path, seed: int) -> list[np.ndarray]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    imgs = ref_images.make_images(seed)
    for i, img in enumerate(imgs):
        path = out / ref_images.image_name(img, i)
        Image.fromarray(img, "RGB").save(path)
        # mmdet decodes with cv2 (BGR); the harness asserts that what it packs equals that decode
        import cv2

        if not np.array_equal(cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1], img):
            raise SystemExit(f"{path}: cv2 does not decode the PNG back to the generated array")
    return imgs


def write_checkpoint(model: str, seed: int, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    _harness()  # its mm_shim must be imported before mmdet
    import mmdet
    import mmengine
    from mmdet.evaluation import get_classes
    from mmengine.runner.checkpoint import save_checkpoint

    net, cfg = build_mmdet_model(model)
    sd = ref_weights.make_state_dict(model, seed)
    check_keys(net, sd, model)
    net.load_state_dict(sd, strict=True)
    digest = ref_weights.state_dict_digest(sd)
    import mmcv

    meta = dict(
        mmdet_version=mmdet.__version__,
        mmengine_version=mmengine.__version__,
        mmcv_version=getattr(mmcv, "__mmcv_lite_version__", mmcv.__version__) + " (mmcv-lite, shimmed)",
        torch_version=str(torch.__version__),
        harness_model=model,
        seed=seed,
        weights="tests/reference/mmdet/weights.py:make_state_dict",
        weights_sha256=digest,
        cfg=cfg.pretty_text,
        dataset_meta=dict(classes=tuple(get_classes("coco"))),
        time=time.strftime("%Y%m%d_%H%M%S"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"meta": meta, "state_dict": sd}, str(path))
    cfg.dump(str(path.with_suffix(".py")))
    return sd, digest


def run_infer(model: str, ckpt: Path, image_dir: Path, out_json: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HARNESS / "mmdet_ref.py"), "--threads", "1", "infer", "--model", model,
           "--ckpt", str(ckpt), "--images", str(image_dir), "--out", str(out_json)]  # fmt: skip
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"harness infer failed for {model}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    print(res.stdout.strip())
    return time.time() - t0


def _raw_path(out_json: Path, name: str) -> Path:
    return out_json.parent / f"{out_json.stem}.{Path(name).stem}.raw.pt"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_determinism(j1: Path, j2: Path) -> None:
    d1, d2 = json.loads(j1.read_text()), json.loads(j2.read_text())
    for name, r1 in d1["images"].items():
        r2 = d2["images"][name]
        for k in ("boxes", "scores", "labels", "masks"):
            if r1.get(k) != r2.get(k):
                raise SystemExit(f"{j1} vs {j2}: {name}: {k} differ between two identical mmdet runs")
        raw1 = torch.load(_raw_path(j1, name), weights_only=True)
        raw2 = torch.load(_raw_path(j2, name), weights_only=True)
        if not _same(raw1, raw2):
            raise SystemExit(f"{j1} vs {j2}: {name}: raw head outputs differ between two identical mmdet runs")
    print(f"determinism: {j1.name} == {j2.name} (detections and every raw tensor bit-identical)")


def subsample(levels: list[torch.Tensor], n_random: int, n_top: int, gen: torch.Generator) -> dict[str, Any]:
    """Seeded random flat indices (plus the top ``n_top`` values) of each level's [C,H,W] tensor."""
    out: dict[str, Any] = {"shapes": [], "index": [], "values": []}
    for t in levels:
        flat = t.reshape(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[: min(n_random, flat.numel())]
        if n_top:
            idx = torch.cat([idx, flat.topk(min(n_top, flat.numel())).indices])
        idx = torch.unique(idx)  # sorted
        out["shapes"].append(list(t.shape))
        out["index"].append(idx)
        out["values"].append(flat[idx].clone())
    return out


def pack_masks(rles: list[dict[str, Any]], h: int, w: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """mmdet's binary masks (RLE in dets.json) as packed-bit crops; also each mask's pixels / box area."""
    from pycocotools import mask as mask_util

    crops, offsets, chunks = [], [0], []
    for r in rles:
        m = mask_util.decode({"size": r["size"], "counts": r["counts"].encode("ascii")}).astype(bool)
        assert m.shape == (h, w), m.shape
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            crops.append([0, 0, 0, 0])
            bits = np.zeros(0, np.uint8)
        else:
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            crops.append([y0, x0, y1 - y0, x1 - x0])
            bits = np.packbits(m[y0:y1, x0:x1].reshape(-1))
        chunks.append(bits)
        offsets.append(offsets[-1] + len(bits))
    packed = {
        "crop": torch.tensor(crops, dtype=torch.int32).reshape(-1, 4),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "bits": torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)),
    }
    return packed, [int(mask_util.area(r)) for r in rles]


def compact_image(kind: str, rec: dict[str, Any], raw: dict[str, Any], exact: dict[str, torch.Tensor],
                  gen: torch.Generator) -> dict[str, Any]:  # fmt: skip
    h, w = rec["height"], rec["width"]
    boxes, scores, labels = exact["boxes"], exact["scores"], exact["labels"]
    assert boxes.tolist() == rec["boxes"] and scores.tolist() == rec["scores"]
    img: dict[str, Any] = dict(height=h, width=w, time_s=float(rec["time_s"]), boxes=boxes.clone(),
                               scores=scores.clone(), labels=labels.to(torch.int64).clone())  # fmt: skip
    if kind == "RetinaNet":
        img["cls_logits"] = subsample(raw["cls_scores"], N_CLS_SAMPLE, N_TOP, gen)
        img["bbox_deltas"] = subsample(raw["bbox_preds"], N_BOX_SAMPLE, 0, gen)
        anchors: dict[str, Any] = {"count": [], "index": [], "values": []}
        for a in raw["anchors"]:
            rand = torch.randperm(a.shape[0] - N_ANCHOR_FIRST, generator=gen)[:N_ANCHOR_RANDOM] + N_ANCHOR_FIRST
            idx = torch.cat([torch.arange(N_ANCHOR_FIRST), rand.sort().values])
            anchors["count"].append(int(a.shape[0]))
            anchors["index"].append(idx)
            anchors["values"].append(a[idx].clone())
        img["anchors"] = anchors
    else:
        img["rpn_cls_logits"] = subsample(raw["rpn_cls_scores"], N_RPN_CLS_SAMPLE, N_TOP, gen)
        img["rpn_bbox_deltas"] = subsample(raw["rpn_bbox_preds"], N_RPN_BOX_SAMPLE, 0, gen)
        img["proposals"] = raw["proposals"][:N_PROPOSALS].clone()
        img["proposal_scores"] = raw["proposal_scores"][:N_PROPOSALS].clone()
        img["num_proposals"] = int(raw["proposals"].shape[0])
        img["rcnn_cls_score"] = raw["rcnn_cls_score"][:N_ROIS].clone()
        img["rcnn_bbox_pred"] = raw["rcnn_bbox_pred"][:N_ROIS].clone()
        k = min(N_MASK_LOGITS, len(labels))
        img["mask_logits"] = raw["mask_logits"][torch.arange(k), labels[:k]].clone()
        img["masks"], areas = pack_masks(rec["masks"], h, w)
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
        img["_mask_fill"] = (torch.tensor(areas, dtype=torch.float64) / (bw * bh).double()).tolist()
    return img


def scores_past_cut(model: str, sd: dict[str, torch.Tensor], imgs: list[np.ndarray], exact: list[Any]) -> list[Any]:
    """Score of mmdet's 101st detection per image (None if fewer): how close the 100-detection cut is.

    Runs mmdet in-process with ``max_per_img`` 101 and checks that its first 100 detections are the
    harness's, bit for bit."""
    h = _harness()
    from mmcv.transforms import Compose
    from mmdet.apis import inference_detector

    net, cfg = build_mmdet_model(model, max_per_img=101)
    net.load_state_dict(sd, strict=True)
    net.cfg = cfg
    pipe = [dict(p) for p in h.TEST_PIPELINE]
    pipe[0] = dict(type="mmdet.LoadImageFromNDArray")
    out = []
    for img, ex in zip(imgs, exact, strict=True):
        with torch.no_grad():
            bgr = np.ascontiguousarray(img[..., ::-1])
            p = inference_detector(net, bgr, test_pipeline=Compose(pipe)).pred_instances
        n = len(ex["scores"])
        for k in ("bboxes", "scores", "labels"):
            if not torch.equal(getattr(p, k)[:n], ex["boxes" if k == "bboxes" else k]):
                raise SystemExit(f"{model}: in-process mmdet (max_per_img 101) differs from the harness's {k}")
        out.append(float(p.scores[n]) if len(p.scores) > n else None)
    return out


def make_model(model: str, seed: int, work: Path, image_dir: Path, imgs: list[np.ndarray], twice: bool) -> None:
    t0 = time.time()
    ckpt = work / "ckpt" / f"{model}.pth"
    sd, digest = write_checkpoint(model, seed, ckpt)
    t_make = time.time() - t0
    out_json = work / "out" / f"{model}.json"
    t_infer = run_infer(model, ckpt, image_dir, out_json)
    if twice:
        out2 = work / "out" / f"{model}.run2.json"
        run_infer(model, ckpt, image_dir, out2)
        check_determinism(out_json, out2)
    dets = json.loads(out_json.read_text())
    exact = torch.load(out_json.with_suffix(".pt"), weights_only=True)
    kind = "RetinaNet" if model.startswith("retinanet") else "MaskRCNN"
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    past_cut = scores_past_cut(model, sd, imgs, [exact[ref_images.image_name(im, i)] for i, im in enumerate(imgs)])
    per_image, stats = [], []
    for i, img in enumerate(imgs):
        name = ref_images.image_name(img, i)
        rec = dets["images"].get(name)
        if rec is None:
            raise SystemExit(f"harness skipped {name}; its sides must be multiples of 32 within 800x1333")
        raw = torch.load(_raw_path(out_json, name), weights_only=True)
        entry = compact_image(kind, rec, raw, exact[name], gen)
        entry["name"] = name
        s = entry["scores"]
        st: dict[str, Any] = dict(name=name, detections=len(s), score_min=float(s.min()), score_max=float(s.max()),
                                  score_101st=past_cut[i], time_s=entry["time_s"])  # fmt: skip
        if kind == "MaskRCNN":
            fill = entry.pop("_mask_fill")
            crop = entry["masks"]["crop"]
            st.update(num_proposals=entry["num_proposals"], mask_fill_min=min(fill), mask_fill_max=max(fill),
                      empty_masks=int((crop[:, 2] == 0).sum()))  # fmt: skip
        stats.append(st)
        per_image.append(entry)
    ref = dict(
        format=1, model=model, kind=kind, seed=seed, weights_sha256=digest,
        image_seed=seed, image_sizes=[list(s) for s in ref_images.SIZES],
        image_sha256=[hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in imgs],
        mmdet_version=dets["mmdet_version"], torch_version=str(torch.__version__),
        torch_threads=int(dets["torch_threads"]), test_cfg=dets["test_cfg"],
        stats=dict(images=stats, make_s=round(t_make, 1), infer_s=round(t_infer, 1)),
        images=per_image,
    )  # fmt: skip
    dst = HERE / f"{model}.pt"
    torch.save(ref, dst)
    torch.load(dst, weights_only=True)  # the tests load it this way
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB) make {t_make:.1f}s infer {t_infer:.1f}s")
    for st in stats:
        print("  ", json.dumps(st))


def calibrate(model: str, seed: int) -> None:
    """Print LAST_LAYERS weight stds giving each last layer's weight part its target output std on image 0."""
    h = _harness()
    from mmcv.transforms import Compose
    from mmdet.apis import inference_detector

    net, cfg = build_mmdet_model(model)
    sd = ref_weights.make_state_dict(model, seed)
    check_keys(net, sd, model)
    net.load_state_dict(sd, strict=True)
    net.cfg = cfg
    pipe = [dict(p) for p in h.TEST_PIPELINE]
    pipe[0] = dict(type="mmdet.LoadImageFromNDArray")
    bgr = np.ascontiguousarray(ref_images.make_images(seed)[0][..., ::-1])
    table = dict(ref_weights.LAST_LAYERS[model])
    for stage in CALIB_STAGES:
        names = [n for n in stage if n in table]
        if not names:
            continue
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = [
            net.get_submodule(n).register_forward_pre_hook(
                lambda _m, inp, n=n, seen=seen: seen.setdefault(n, []).append(inp[0].detach())
            )
            for n in names
        ]
        with torch.no_grad():
            inference_detector(net, bgr, test_pipeline=Compose(pipe))
        for hk in hooks:
            hk.remove()
        for n in names:
            layer = net.get_submodule(n)
            rms = float(torch.cat([x.reshape(-1) for x in seen[n]]).pow(2).mean().sqrt())
            fan_in = layer.weight[0].numel()
            target = TARGET_STD_OVERRIDE.get((model, n), TARGET_STD[n])
            new = float(f"{target / (fan_in**0.5 * rms * CLAMPED_NORMAL_STD):.3g}")
            old = table[n][0]
            with torch.no_grad():
                layer.weight.mul_(new / old)
            table[n] = (new, *table[n][1:])
            print(f"{model}: {n}: input rms {rms:.4g}, fan_in {fan_in} -> weight std {new}")
    print(f'    "{model}": {{')
    for n, v in table.items():
        print(f'        "{n}": {v!r},')
    print("    },")


def write_samples(seed: int) -> None:
    """Two tiny real mmengine checkpoints for the checkpoint reader's tests (2 small tensors each):
    ``mmengine_meta_sample.pth``: the harness's meta (plain types) through ``save_checkpoint``;
    ``mmengine_runner_sample.pth``: what ``mmengine.runner.Runner.save_checkpoint`` adds in training
    (meta epoch/iter/experiment_name/dataset_meta with palette, ``message_hub`` with HistoryBuffers,
    optimizer and param_scheduler state)."""
    h = _harness()
    import mmcv
    import mmdet
    import mmengine
    from mmdet.datasets import CocoDataset
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint
    from mmengine.utils import get_git_hash

    cfg = h.build_cfg("retinanet_pvtv2_b0")
    gen = torch.Generator().manual_seed(seed)
    sd = {"neck.lateral_convs.0.conv.weight": torch.randn(4, 3, 1, 1, generator=gen),
          "neck.lateral_convs.0.conv.bias": torch.randn(4, generator=gen)}  # fmt: skip
    meta = dict(
        mmdet_version=mmdet.__version__, mmengine_version=mmengine.__version__,
        mmcv_version=getattr(mmcv, "__mmcv_lite_version__", mmcv.__version__) + " (mmcv-lite, shimmed)",
        torch_version=str(torch.__version__), harness_model="retinanet_pvtv2_b0", seed=seed,
        cfg=cfg.pretty_text, dataset_meta=dict(classes=tuple(CocoDataset.METAINFO["classes"])),
        time=time.strftime("%Y%m%d_%H%M%S"),
    )  # fmt: skip
    save_checkpoint({"meta": meta, "state_dict": sd}, str(HERE / "mmengine_meta_sample.pth"))

    hub = MessageHub.get_instance("pvt_sample")
    for i in range(5):
        hub.update_scalar("train/loss", 1.0 / (i + 1))
        hub.update_scalar("train/lr", np.float64(0.0001))
        hub.update_scalar("train/time", torch.tensor(0.5 + i))
    hub.update_info("epoch", 1)
    hub.update_info("iter", 5)
    params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.001, total_iters=500)
    runner_meta = dict(meta, epoch=1, iter=5, experiment_name="retinanet_pvtv2_b0_sample",
                       mmengine_version=mmengine.__version__ + get_git_hash(),
                       dataset_meta=dict(CocoDataset.METAINFO))  # fmt: skip
    ckpt = {"meta": runner_meta, "state_dict": sd, "message_hub": hub.state_dict(), "optimizer": opt.state_dict(),
            "param_schedulers": [sched.state_dict()]}  # fmt: skip
    save_checkpoint(ckpt, str(HERE / "mmengine_runner_sample.pth"))
    for name in ("mmengine_meta_sample.pth", "mmengine_runner_sample.pth"):
        p = HERE / name
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        try:
            torch.load(p, weights_only=True)
            verdict = "loads with weights_only=True"
        except Exception as e:  # report whatever torch refuses
            verdict = f"weights_only=True refuses it: {str(e).splitlines()[0][:200]}"
        print(f"{name}: {p.stat().st_size} bytes; unsafe globals {unsafe}; {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(ref_weights.MODELS), choices=ref_weights.MODELS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/mmdet-ref-work"))
    p.add_argument("--no-determinism-check", action="store_true", help="run mmdet once per model, not twice")
    p.add_argument("--calibrate", metavar="MODEL", choices=ref_weights.MODELS)
    p.add_argument("--samples", action="store_true", help="write the two mmengine checkpoint samples only")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.calibrate:
        calibrate(args.calibrate, args.seed)
        return
    if args.samples:
        write_samples(args.seed)
        return
    image_dir = args.work / "images"
    imgs = write_images(image_dir, args.seed)
    for model in args.models:
        make_model(model, args.seed, args.work, image_dir, imgs, not args.no_determinism_check)


if __name__ == "__main__":
    main()
