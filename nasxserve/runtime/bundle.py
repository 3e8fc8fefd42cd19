"""Load a bundle, check it, and predict or explain with ONNX Runtime (numpy, Pillow, onnxruntime only)."""
from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nasxserve.contracts import (ClassScore, Evidence, Explanation, ExplanationData, ExplanationMeta, Manifest,
                                 ModelInfo, PrototypeEntry, PrototypeSource, prototype_urls)
from nasxserve.errors import BundleError, ImageError
from nasxserve.boxes import activation_boxes, scale_box, upsample_bicubic
from nasxserve.regions import (DEFAULT_REGION_RULE, EVIDENCE_RULE_VERSION, EVIDENCE_RULE_WORDS, REGION_RULES,
                               evidence_batch, evidence_boxes)
from nasxserve.explain.consistency import mislabelled_prototypes, own_class_share
from nasxserve.imaging import ImageSource, normalize, open_image, resize_to, to_model_mode, to_uint8_chw
from nasxserve.runtime.format import INPUT_NAME, MANIFEST, ONNX_FILE, OUTPUT_NAMES, PARITY_FILE
from nasxserve.runtime.files import check_claims, read_manifest, read_regular, verify_files
from nasxserve.runtime.parity import Agreement, ParityRule, compare
from nasxserve.runtime.session import create_session
from nasxserve.runtime.signing import check_signature

BATCH = 32


BRIGHTNESS_SLACK = 0.05


@dataclass
class PreparedImages:
    """Images ready for the model.

    x: (B, C, H, W) float32 for the B usable images; sizes: their original (width, height);
    index: their positions in the caller's list; errors: position -> message for the unusable ones;
    brightness: each usable image's mean pixel / 255 at the model's size.
    """

    x: np.ndarray
    sizes: list[tuple[int, int]]
    index: list[int]
    errors: dict[int, str]
    brightness: list[float]

    def results(self, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers for the usable images and ``{"error": ...}`` for the others, in the caller's order."""
        usable = iter(answers)
        return [{"error": self.errors[i]} if i in self.errors else next(usable)
                for i in range(len(self.errors) + len(self.index))]


def same_patch_groups(prototypes: Sequence[PrototypeEntry]) -> np.ndarray:
    """(m,) int64: for each prototype, the lowest id of the prototypes projected onto the same training patch
    (the same source image and latent position, so the same vector); its own id where it has no twin."""
    first: dict[tuple[Any, ...], int] = {}
    group = np.arange(len(prototypes), dtype=np.int64)
    for j, proto in enumerate(prototypes):
        source = proto.source
        key = (source.split, source.index, *source.latent_position)
        group[j] = first.setdefault(key, j)
    return group


def image_and_copies(outputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The model's outputs on an evidence batch (:meth:`Bundle.evidence_batch`: the image first, then its hidden
    copies, in one call) -> (the image's outputs, each (1, ...); the (1 + G, m) similarities the ``evidence`` rule
    reads, the image's included)."""
    return {name: value[:1] for name, value in outputs.items()}, outputs["similarities"]


@dataclass(frozen=True)
class SourceView:
    """A prototype's source patch as one region rule shows it: the rule that drew it (``regions``), the
    exclusive box in the source image and the bundle's two PNGs (patch, and source image with the box)."""

    regions: str
    box: list[int]
    patch: str
    context: str


def source_view(proto: PrototypeEntry, regions: str) -> SourceView:
    """Prototype ``proto``'s source as the region rule ``regions`` draws it, so that the training patch an
    explanation shows is boxed by the rule that boxed the new image. A bundle exported before source images had
    evidence boxes, or whose boxes an older version of the evidence rule drew, is shown with ProtoPNet's
    activation box; the view then says so in ``regions``."""
    evidence = proto.source.evidence_box
    current = proto.source.evidence_rule_version == EVIDENCE_RULE_VERSION
    if regions == "evidence" and current and evidence is not None and proto.evidence_patch and proto.evidence_context:
        return SourceView("evidence", list(evidence), proto.evidence_patch, proto.evidence_context)
    return SourceView("activation", list(proto.source.box), proto.patch, proto.context)


@dataclass
class ClassEvidence:
    """The evidence for class k of one image, which :meth:`Bundle.explain_class` and :meth:`Bundle.explanation`
    answer with: its logit and probability, the sum of all m contributions and the own-class share, and for
    each of the top prototypes (by group contribution) its id, duplicates, box in the image's pixels, similarity,
    and the group's weight and contribution."""

    k: int
    logit: float
    probability: float
    total: float
    own_class_share: float | None
    prototypes: list[int]
    boxes: list[list[int]]
    duplicates: list[list[int]]
    similarity: np.ndarray
    weight: np.ndarray
    contribution: np.ndarray


def heatmap_png(similarity_map: np.ndarray, hw: tuple[int, int]) -> str:
    """A similarity map upsampled (bicubic) to the model's input size ``hw``, min-max scaled to 0..255, as a
    base64 PNG."""
    up = upsample_bicubic(similarity_map, hw)
    span = float(up.max() - up.min())
    grey = np.zeros(hw, np.uint8) if span == 0 else np.round((up - up.min()) * (255.0 / span)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Bundle:
    """An exported model ready for inference. Build it with :func:`load_bundle`.

    Attributes:
        root: the bundle folder; manifest: its manifest.json (:class:`~nasxserve.contracts.Manifest`); classes:
        K class names; prototypes: the manifest's prototype table; provider: the ONNX Runtime execution provider
        in use (``CUDAExecutionProvider`` or ``CPUExecutionProvider``).
    """

    def __init__(self, root: Path, manifest: Manifest, session: Any):
        self.root = root
        self.manifest = manifest
        self.session = session
        self.classes: list[str] = list(manifest.classes)
        spec = manifest.input
        self.channels, self.height, self.width = spec.channels, spec.height, spec.width
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)
        self.weight = np.asarray(manifest.last_layer.weight, np.float32)                  # (K, m)
        self.prototypes: list[PrototypeEntry] = manifest.prototypes
        self._labels = np.asarray([p.class_index for p in self.prototypes], np.int64)      # (m,)
        self._group = same_patch_groups(self.prototypes)                                    # (m,)
        # (m, 2) (dx, dy); zeros unless the run calibrated its boxes
        self.box_offsets = np.asarray([p.box_offset for p in self.prototypes], np.int64).reshape(-1, 2)
        self._check_graph()

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _check_graph(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise BundleError(f"{ONNX_FILE} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] "
                              f"and {list(OUTPUT_NAMES)}")
        k, m = self.weight.shape
        if k != len(self.classes) or m != len(self.prototypes):
            raise BundleError(f"{MANIFEST}: last-layer weight is {k}x{m} but there are {len(self.classes)} classes "
                              f"and {len(self.prototypes)} prototypes")

    # ------------------------------------------------------------------ inputs and raw outputs
    def prepare(self, images: Sequence[ImageSource], errors: str = "raise") -> PreparedImages:
        """Decode, convert, resize and normalise like the training data (see :mod:`nasxserve.imaging`).

        ``errors="raise"``: an unusable image raises :class:`ImageError`; ``"report"``: it is set aside
        with its message in ``PreparedImages.errors``.
        """
        if errors not in ("raise", "report"):
            raise ValueError(f"errors must be 'raise' or 'report', not {errors!r}")
        pixels, sizes, index, failed = [], [], [], {}
        for i, source in enumerate(images):
            try:
                img = to_model_mode(open_image(source), self.channels)
            except ImageError as e:
                if errors == "raise":
                    raise
                failed[i] = str(e)
                continue
            sizes.append(img.size)
            index.append(i)
            pixels.append(to_uint8_chw(resize_to(img, self.width, self.height)))
        shape = (0, self.channels, self.height, self.width)
        x = normalize(np.stack(pixels), self.mean, self.std) if pixels else np.zeros(shape, np.float32)
        return PreparedImages(x, sizes, index, failed, [float(p.mean()) / 255.0 for p in pixels])

    def input_warning(self, brightness: float) -> str | None:
        """Why an image of mean ``brightness`` (pixel / 255) looks unlike the training images, or None: outside
        their 1st-99th percentile (manifest ``input.brightness``, 0.05 of slack), and in particular when its
        negative would be inside (light strokes on dark drawn dark on light). None for a bundle that does not
        record the range."""
        spread = self.manifest.input.brightness
        if spread is None:
            return None
        lo, hi = spread.p1 - BRIGHTNESS_SLACK, spread.p99 + BRIGHTNESS_SLACK
        if lo <= brightness <= hi:
            return None
        seen = (f"the training images' mean brightness is {spread.p1:.2f}-{spread.p99:.2f}, this one's "
                f"{brightness:.2f}")
        if lo <= 1.0 - brightness <= hi:
            return (f"the image looks inverted: {seen}, and its negative would fit; the model was trained on "
                    f"{'dark' if spread.median < 0.5 else 'light'} backgrounds, and a prediction on this image "
                    f"means little")
        return f"the image is {'brighter' if brightness > hi else 'darker'} than any training image: {seen}"

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The five raw outputs for x (B, C, H, W) float32 normalised, in chunks of 32 images."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected = (self.channels, self.height, self.width)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"input must be (B, {', '.join(map(str, expected))}); got {x.shape}")
        if len(x) == 0:
            return {name: np.zeros((0,)) for name in OUTPUT_NAMES}
        chunks = [self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i:i + BATCH]})
                  for i in range(0, len(x), BATCH)]
        return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(OUTPUT_NAMES)}

    # ------------------------------------------------------------------ answers
    def _class_scores(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K,) logits -> (logits as float64, softmax probabilities)."""
        z = logits.astype(np.float64)
        p = np.exp(z - z.max())
        return z, p / p.sum()

    def _class_entry(self, z: np.ndarray, p: np.ndarray, k: int) -> dict[str, Any]:
        return {"index": int(k), "class": self.classes[k], "probability": float(p[k]), "logit": float(z[k])}

    def top_classes(self, logits: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        z, p = self._class_scores(logits)
        order = np.argsort(-z, kind="stable")[:max(1, min(top_k, len(self.classes)))]
        return [self._class_entry(z, p, k) for k in order]

    def predict(self, images: Sequence[ImageSource], top_k: int = 5, errors: str = "raise") -> list[dict[str, Any]]:
        """For each image: ``{"image": {"width", "height"}, "predictions": [{"index", "class",
        "probability", "logit"}, ...]}`` with the ``top_k`` classes, most likely first. With
        ``errors="report"`` an unusable image gets ``{"error": message}`` instead of raising."""
        prepared = self.prepare(images, errors)
        out = self.run(prepared.x)
        return prepared.results([{"image": {"width": w, "height": h},
                                  "predictions": self.top_classes(out["logits"][b], top_k),
                                  "warnings": self.warnings(prepared, b)}
                                 for b, (w, h) in enumerate(prepared.sizes)])

    def warnings(self, prepared: PreparedImages, b: int) -> list[str]:
        """The answer's ``warnings`` for usable image ``b`` of ``prepared``: :meth:`input_warning`, if any."""
        warning = self.input_warning(prepared.brightness[b])
        return [warning] if warning else []

    def explain(self, images: Sequence[ImageSource], top_k: int = 1, top_prototypes: int = 5,
                errors: str = "raise", regions: str = DEFAULT_REGION_RULE) -> list[dict[str, Any]]:
        """Predictions with their evidence (NASXNet figure 1: "this looks like that").

        For each image and each of its ``top_k`` classes k: the ``top_prototypes`` prototypes j with the
        largest contribution ``weight[k, j] * similarity[j]``, each with its box in the caller's image pixels by
        the region rule ``regions`` (:mod:`nasxserve.regions`: ``evidence``, where hiding the input lowers the
        similarity, which runs the image with at most 64 + 49 hidden copies of it; or ``activation``, ProtoPNet's box
        of the best match, moved by the prototype's ``box_offset`` where the run calibrated its boxes),
        ``evidence_total``, the sum of all m contributions, which equals the logit of k up to float rounding,
        and ``own_class_share``, the share of the absolute contributions carried by class k's own prototypes
        (None when all are 0). Each prototype's training patch (``source_box``, ``patch``, ``context``) is boxed
        by the same rule (:func:`source_view`; ``source_regions`` names it). ``errors`` as in :meth:`predict`.

        Prototypes that global projection put on the same training patch are the same vector, so they match
        every image alike: they are listed once, as the lowest id, with the others' ids in ``duplicates`` and
        the group's summed weight and contribution (still weight x similarity).
        """
        if regions not in REGION_RULES:
            raise ValueError(f"unknown region rule {regions!r}; choose one of {', '.join(REGION_RULES)}")
        prepared = self.prepare(images, errors)
        if regions == "evidence" and len(prepared.x):
            runs = [image_and_copies(self.run(self.evidence_batch(x))) for x in prepared.x]
            out = {name: np.concatenate([image[name] for image, _ in runs]) for name in OUTPUT_NAMES}
            occluded: list[np.ndarray | None] = [copies for _, copies in runs]
        else:
            out, occluded = self.run(prepared.x), [None] * len(prepared.x)
        return prepared.results([dict(self._explain_one(out, b, size, top_k, top_prototypes, regions, occluded[b]),
                                      warnings=self.warnings(prepared, b))
                                 for b, size in enumerate(prepared.sizes)])

    def class_index(self, name: str) -> int:
        """The index of a class given by name, or by index as a string; ValueError if there is none."""
        if name in self.classes:
            return self.classes.index(name)
        if name.isascii() and name.isdigit() and int(name) < len(self.classes):
            return int(name)
        shown = self.classes if len(self.classes) <= 20 else self.classes[:20] + ["..."]
        raise ValueError(f"unknown class {name[:100]!r}; the classes are {shown} (or their index)")

    def _explain_one(self, out: dict[str, np.ndarray], b: int, size: tuple[int, int], top_k: int,
                     top_prototypes: int, regions: str, occluded: np.ndarray | None) -> dict[str, Any]:
        predictions = self.top_classes(out["logits"][b], top_k)
        return {"image": {"width": size[0], "height": size[1]}, "predictions": predictions, "regions": regions,
                "explanations": [self.explain_class(out, b, size, p["index"], top_prototypes, regions=regions,
                                                   occluded=occluded)
                                 for p in predictions]}

    def evidence_batch(self, x: np.ndarray) -> np.ndarray:
        """(C, H, W) normalised image -> (1 + G, C, H, W): the images whose similarities the ``evidence`` region
        rule needs (:func:`nasxserve.regions.evidence_batch`): the image, then a copy per block of the latent
        grid and of that grid shifted by half a block with that block hidden, G <= 64 + 49."""
        grid = self.manifest.latent_grid
        return evidence_batch(x, (grid.height, grid.width))

    def _boxes(self, out: dict[str, np.ndarray], b: int, top: np.ndarray, regions: str,
               occluded: np.ndarray | None) -> list[tuple[int, int, int, int]]:
        """The boxes of prototypes ``top`` in image ``b`` by the region rule ``regions``, in the model's input
        pixels; ``occluded`` (1 + G, m) the similarities of :meth:`evidence_batch` (``evidence`` rule only)."""
        hw = (self.height, self.width)
        if regions == "activation":
            return activation_boxes(out["similarity_maps"][b, top], hw, offsets=self.box_offsets[top])
        if regions != "evidence":
            raise ValueError(f"unknown region rule {regions!r}; choose one of {', '.join(REGION_RULES)}")
        if occluded is None:
            raise ValueError("the evidence region rule needs the similarities of the image's evidence batch")
        grid = self.manifest.latent_grid
        return evidence_boxes(occluded[:, top], (grid.height, grid.width), hw)

    def _evidence(self, out: dict[str, np.ndarray], b: int, size: tuple[int, int], k: int,
                  top_prototypes: int, regions: str = DEFAULT_REGION_RULE,
                  occluded: np.ndarray | None = None) -> ClassEvidence:
        """The evidence for class ``k`` of image ``b`` of the raw outputs ``out`` (see :meth:`explain`)."""
        if not 0 <= k < len(self.classes):
            raise ValueError(f"class index {k} is out of range")
        z, p = self._class_scores(out["logits"][b])
        sims = out["similarities"][b].astype(np.float64)
        contributions = self.weight[k].astype(np.float64) * sims
        # a group of identical prototypes is one piece of evidence, indexed by its lowest id
        group_weight = np.bincount(self._group, weights=self.weight[k].astype(np.float64), minlength=len(sims))
        group_contribution = np.bincount(self._group, weights=contributions, minlength=len(sims))
        leaders = np.flatnonzero(self._group == np.arange(len(sims)))
        top = leaders[np.argsort(-group_contribution[leaders], kind="stable")][:max(0, top_prototypes)]
        boxes = self._boxes(out, b, top, regions, occluded)
        share = own_class_share(self.weight, sims[None, :], np.asarray([k]), self._labels)[0]
        return ClassEvidence(k=int(k), logit=float(z[k]), probability=float(p[k]), total=float(contributions.sum()),
                             own_class_share=None if np.isnan(share) else float(share),
                             prototypes=[int(j) for j in top],
                             boxes=[list(scale_box(box, (self.width, self.height), size)) for box in boxes],
                             duplicates=[[int(i) for i in np.flatnonzero(self._group == j) if i != j] for j in top],
                             similarity=sims[top], weight=group_weight[top], contribution=group_contribution[top])

    def explain_class(self, out: dict[str, np.ndarray], b: int, size: tuple[int, int], k: int,
                      top_prototypes: int, *, regions: str, occluded: np.ndarray | None) -> dict[str, Any]:
        """The evidence for class ``k`` of image ``b`` of the raw outputs ``out`` (see :meth:`explain`);
        ``size`` is the image's original (width, height); ``occluded`` as in :meth:`_boxes`."""
        e = self._evidence(out, b, size, k, top_prototypes, regions, occluded)
        grid_w = out["similarity_maps"].shape[3]
        evidence = []
        for i, j in enumerate(e.prototypes):
            proto = self.prototypes[j]
            view = source_view(proto, regions)
            pos = int(out["best_patch"][b, j])
            evidence.append({
                "prototype": j, "prototype_class": proto.class_, "prototype_class_index": proto.class_index,
                "duplicates": e.duplicates[i],
                "similarity": float(e.similarity[i]), "weight": float(e.weight[i]),
                "contribution": float(e.contribution[i]), "distance": float(out["min_distances"][b, j]),
                "box": e.boxes[i],
                "latent_position": [pos // grid_w, pos % grid_w],
                "source_regions": view.regions, "source_box": view.box, "patch": view.patch, "context": view.context,
            })
        return {"index": e.k, "class": self.classes[e.k], "probability": e.probability, "logit": e.logit,
                "evidence_total": e.total, "own_class_share": e.own_class_share, "evidence": evidence}

    # ------------------------------------------------------------------ the HTTP answers (nasxserve.contracts)
    def model_info(self) -> ModelInfo:
        """The model an answer comes from: the bundle's name, exporting version and model.onnx's sha256."""
        m = self.manifest
        return ModelInfo(name=m.name, version=m.nasx_version, sha256=m.files[ONNX_FILE].sha256)

    def scores(self, logits: np.ndarray, top_k: int) -> list[ClassScore]:
        """The ``top_k`` classes of (K,) ``logits``, most likely first, as ``/predict`` answers them."""
        return [ClassScore(class_id=c["index"], label=c["class"], score=c["probability"], logit=c["logit"])
                for c in self.top_classes(logits, top_k)]

    def explanation(self, out: dict[str, np.ndarray], b: int, size: tuple[int, int], k: int, top_prototypes: int,
                    heatmaps: bool = False, *, regions: str, occluded: np.ndarray | None) -> Explanation:
        """The evidence for class ``k`` of image ``b`` (see :meth:`explain`) as ``/explain`` answers it; with
        ``heatmaps`` each prototype's similarity map as a PNG (:func:`heatmap_png`); ``occluded`` as in
        :meth:`_boxes`."""
        e = self._evidence(out, b, size, k, top_prototypes, regions, occluded)
        evidence = []
        for i, j in enumerate(e.prototypes):
            proto = self.prototypes[j]
            view = source_view(proto, regions)
            patch_url, context_url = prototype_urls(j, view.regions)
            evidence.append(Evidence(
                prototype_id=j, duplicates=e.duplicates[i], class_id=proto.class_index, label=proto.class_,
                similarity=float(e.similarity[i]), weight=float(e.weight[i]), contribution=float(e.contribution[i]),
                box_xyxy=e.boxes[i],
                heatmap=heatmap_png(out["similarity_maps"][b, j], (self.height, self.width)) if heatmaps else None,
                source=PrototypeSource(sample=proto.source.index, box_xyxy=view.box, regions=view.regions,
                                       patch_url=patch_url, context_url=context_url)))
        return Explanation(meta=ExplanationMeta(box_rule=self.box_rule(regions), regions=regions),
                           data=ExplanationData(target_class_id=k, label=self.classes[k], logit=e.logit,
                                                evidence_sum=e.total, own_class_share=e.own_class_share,
                                                top_prototypes=evidence))

    def box_rule(self, regions: str) -> str:
        """What the boxes of the region rule ``regions`` show, in words."""
        return self.manifest.box_rule if regions == "activation" else EVIDENCE_RULE_WORDS

    def verify(self) -> Agreement:
        """Run the inputs stored at export and compare with PyTorch's outputs stored beside them."""
        with np.load(self.root / PARITY_FILE, allow_pickle=False) as data:
            expected = {n: data[n] for n in OUTPUT_NAMES}
            x = data["input"]
        return compare(expected, self.run(x), ParityRule.from_manifest(self.manifest))

    def mislabelled_prototypes(self) -> list[int]:
        """Ids of the prototypes whose recorded class is not the class of their largest positive last-layer
        weight (:func:`nasxserve.explain.consistency.mislabelled_prototypes`); empty for a sound bundle."""
        return [self.prototypes[j].id for j in mislabelled_prototypes(self.weight, self._labels)]

    def file_bytes(self, rel: str) -> bytes:
        """A file of the bundle (e.g. a prototype PNG) as listed in the manifest, checked against its sha256 as it
        is read: the folder may have changed since it was loaded."""
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise BundleError(f"{rel} is not a file of this bundle")
        data = read_regular(self.root / rel)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(f"bundle file {rel} no longer matches its sha256 in {MANIFEST}: it was changed after "
                              f"the bundle was loaded")
        return data


def load_bundle(path: str | Path, provider: str = "auto", threads: int | None = None,
                trusted_keys: Sequence[str | Path] = ()) -> Bundle:
    """Open the bundle at ``path``: check its manifest, format version, digest and every file's sha256, start an
    ONNX Runtime session (CUDA when it really works with ``provider="auto"``, else CPU) and check the
    model's input and output names and the manifest's claims against the model files (:func:`check_claims`).
    With ``trusted_keys`` (Ed25519 public key PEM files), the bundle must also be signed by one of them
    (:mod:`nasxserve.runtime.signing`). Raises :class:`BundleError` naming the problem."""
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    if trusted_keys:
        check_signature(root, manifest.bundle_digest.sha256, [Path(k).expanduser() for k in trusted_keys])
    model = verify_files(root, manifest, keep=(ONNX_FILE,))[ONNX_FILE]
    try:
        session = create_session(model, provider, threads)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        if type(e).__module__.startswith("nasxserve"):
            raise
        raise BundleError(f"ONNX Runtime cannot load {root / ONNX_FILE}: {e}") from None
    try:
        bundle = Bundle(root, manifest, session)       # checks the graph's input and output names first
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise BundleError(f"{root / MANIFEST} is malformed ({type(e).__name__}: {str(e)[:200]}); re-export the "
                          f"bundle") from None
    check_claims(root, manifest, session)
    return bundle
