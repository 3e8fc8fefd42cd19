"""``nasx export``, ``nasx verify``, ``nasx predict`` and ``nasx explain``.

predict, explain and verify run on ONNX Runtime and import no torch (verify adds a live PyTorch check
when torch is installed); export needs the training extra.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nasxserve.cli.output import stdout_console
from nasxserve.errors import BundleError, ConfigError
from nasxserve.runtime.format import RTOL
from nasxserve.regions import DEFAULT_REGION_RULE, REGION_RULES

console = Console(stderr=True, soft_wrap=True)      # messages: a digest or a path stays one line in a log

PROVIDER = typer.Option("auto", "--provider",
                        help="ONNX Runtime execution provider: auto (CUDA when it really works, else CPU), "
                             "cpu or cuda.")
JSON = typer.Option(False, "--json", help="Print JSON (the runtime's result objects) instead of a table.")
TRUSTED_KEY = typer.Option(None, "--trusted-key",
                           help="An Ed25519 public key (PEM, as nasx keygen writes KEY.pub): refuse the bundle unless "
                                "it is signed by this key (nasx sign, nasx export --sign-key).")


def _formats(text: str) -> list[str]:
    from nasxserve.runtime.format import FORMAT_FILES as FORMATS
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ConfigError(f"--formats takes a comma-separated list of {', '.join(FORMATS)}; got {text!r}")
    return names


def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory (from nasx train)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    formats: str = typer.Option("onnx,torchscript,pt2", "--formats",
                                help="Model formats, comma-separated: onnx (always written), torchscript, pt2."),
    opset: int = typer.Option(18, "--opset", min=18, help="ONNX opset (the dynamo exporter needs 18 or newer)."),
    data: Optional[str] = typer.Option(None, "--data", help="Where the run's dataset is now, if it moved "
                                                             "(NAME or NAME:PATH); real images are used for the "
                                                             "parity check."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name, which nasx serve serves it as (default: the "
                                                             "dataset's name, e.g. digits)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out (only once the new one "
                                                      "has passed its checks)."),
    parity_rtol: float = typer.Option(RTOL, "--parity-rtol", min=0.0,
                                      help="Relative tolerance of the parity check: each output may differ from "
                                           "PyTorch by its absolute tolerance plus this times the image's largest "
                                           "value of that output (float32 rounding grows with the model). Recorded "
                                           "for nasx verify."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the manifest's parity summary as JSON."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key",
                                            help="Sign the bundle with this Ed25519 private key (PEM, as nasx keygen "
                                                 "writes it), so that nasx verify and nasx serve --trusted-key "
                                                 "KEY.pub can tell it is yours."),
) -> None:
    """Freeze a trained run into a verified bundle.

    ONNX + TorchScript + torch.export + safetensors + manifest; each model format is checked against PyTorch
    before the bundle is written.
    """
    chosen = _formats(formats)
    key = None
    if sign_key is not None:
        from nasxserve.runtime.signing import load_private_key
        key = load_private_key(sign_key)    # a wrong key fails now, not after minutes of exporting
    from nasxserve.export.bundle import export_bundle
    with console.status("exporting", spinner="dots") as status:
        result = export_bundle(run_dir, out, chosen, opset=opset, data_spec=data, force=force, name=name,
                               step=lambda message: None if quiet else status.update(message), parity_rtol=parity_rtol)
    digest = result.manifest.bundle_digest.sha256
    signer = None
    if key is not None:
        from nasxserve.runtime.signing import sign_bundle
        signer = sign_bundle(result.path, digest, key)
    if quiet:
        print(json.dumps(result.manifest.export.as_json({"parity"})["parity"]))
        return
    screen = stdout_console()
    _line(screen, f"{result.path}: each format against PyTorch")     # a line keeps the path whole, a title wraps it
    table = Table()
    for col in ("format", "images", "max |logit diff|", "max |similarity diff|", "top-1 equal", "ok"):
        table.add_column(col)
    for fmt, a in result.parity.items():
        table.add_row(fmt, str(a.images), f"{a.max_abs['logits']:.1e}", f"{a.max_abs['similarities']:.1e}",
                      "yes" if a.top1_mismatches == 0 else f"{a.top1_mismatches} differ", "yes" if a.ok else "NO")
    screen.print(table)
    files = result.manifest.files
    console.print(f"{len(files)} files, {sum(f.bytes for f in files.values()) / 1e6:.1f} MB; bundle digest {digest}"
                  + (f"; signed by {signer}" if signer else "") + f"; try: nasx predict {result.path} IMAGE",
                  markup=False)


def _load(bundle: Path, provider: str, trusted_key: Optional[Path] = None):
    from nasxserve.runtime import load_bundle
    return load_bundle(bundle, provider, trusted_keys=[trusted_key] if trusted_key else [])


def keygen(
    key: Path = typer.Argument(..., help="The private key file to write; the public key goes to KEY.pub."),
) -> None:
    """Make an Ed25519 key pair for signing bundles.

    Keep KEY to yourself (it is written readable by you only) and give KEY.pub to whoever serves your bundles:
    nasx export --sign-key KEY (or nasx sign BUNDLE --key KEY) signs, nasx verify / nasx serve --trusted-key
    KEY.pub checks. Needs pip install 'nasx[sign]'.
    """
    from nasxserve.runtime.signing import generate_key
    public = generate_key(key)
    console.print(f"wrote {key} (private: keep it) and {public} (public: hand it out)", markup=False)


def sign(
    bundle: Path = typer.Argument(..., help="Bundle folder (from nasx export)."),
    key: Path = typer.Option(..., "--key", help="Your Ed25519 private key (PEM, as nasx keygen writes it)."),
) -> None:
    """Sign a bundle with your key, after checking it.

    The signature covers the bundle digest, which covers every file; it is written to the bundle's
    signature.json (replacing an earlier one). nasx verify and nasx serve --trusted-key KEY.pub check it.
    """
    from nasxserve.runtime.signing import load_private_key, sign_bundle
    private = load_private_key(key)
    b = _load(bundle, "cpu")                # only an intact, consistent bundle is signed
    signer = sign_bundle(b.root, b.manifest.bundle_digest.sha256, private)
    console.print(f"signed {bundle} (digest {b.manifest.bundle_digest.sha256}) with the key {signer}", markup=False)


def verify(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    provider: str = PROVIDER,
    as_json: bool = JSON,
    expect_digest: Optional[str] = typer.Option(
        None, "--expect-digest",
        help="The bundle digest (sha256 hex, as nasx export and nasx verify print it) you got from the bundle's "
             "author by another way; refuse the bundle unless it is this one. Without it the digest proves the "
             "bundle is intact, not who made it."),
    trusted_key: Optional[Path] = TRUSTED_KEY,
    trust_torch_files: bool = typer.Option(
        False, "--trust-torch-files",
        help="Also load model.ts (torch.jit.load) and model.pt2 (torch.export.load) and check them against "
             "PyTorch. Loading them unpickles their contents, which EXECUTES CODE FROM THE BUNDLE: use it only on "
             "bundles you made or trust. Without it they are checked against their sha256 only."),
) -> None:
    """Re-check a bundle: its files, its prototypes' labels and ONNX Runtime against PyTorch.

    Checks the manifest, the format version, every file's sha256, that every prototype supports the class it
    is shown with, and ONNX Runtime against PyTorch rebuilt from weights.safetensors. Nothing in the bundle is
    unpickled unless --trust-torch-files is given.
    """
    from nasxserve.runtime.format import FORMAT_FILES
    b = _load(bundle, provider, trusted_key)
    digest = b.manifest.bundle_digest.sha256
    if expect_digest is not None and expect_digest.strip().lower().removeprefix("sha256:") != digest:
        raise BundleError(f"{bundle} has the bundle digest {digest}, not the expected {expect_digest.strip()}: it is "
                          f"not the bundle you were given the digest of")
    mislabelled = b.mislabelled_prototypes()
    torch_files = [fmt for fmt, rel in FORMAT_FILES.items() if fmt != "onnx" and rel in b.manifest.files]
    report: dict[str, Any] = {"bundle": str(bundle), "checksums": "ok", "digest": digest, "provider": b.provider,
                              "signature": _signature_state(b.root, trusted_key),
                              "prototype_labels": {"ok": not mislabelled, "mislabelled": mislabelled},
                              "onnx_vs_stored_pytorch": b.verify().to_dict()}
    try:
        from nasxserve.export.verify import live_parity
    except ImportError:
        report["live_pytorch"] = "skipped: torch is not installed (pip install 'nasx[train]')"
    else:
        report["live_pytorch"] = {fmt: a.to_dict() for fmt, a in live_parity(b, trust_torch_files).items()}
    loaded = trust_torch_files and isinstance(report["live_pytorch"], dict)
    not_loaded = "sha256 only, not loaded (loading unpickles it: --trust-torch-files)"
    report["torch_files"] = {fmt: "loaded and compared" if loaded else not_loaded for fmt in torch_files}
    checks = [report["onnx_vs_stored_pytorch"]]
    if isinstance(report["live_pytorch"], dict):
        checks += report["live_pytorch"].values()
    ok = all(c["ok"] for c in checks) and not mislabelled
    if as_json:
        print(json.dumps(dict(report, ok=ok), indent=2))
    else:
        _say(f"checksums: ok ({len(b.manifest.files)} files, the manifest's claims agree with the model files); "
             f"provider: {b.provider}")
        _say(f"bundle digest: {digest}" + (" (as expected)" if expect_digest else ""))
        _say(f"signature: {report['signature']}")
        _say("prototype labels: ok (each prototype's largest last-layer weight is positive and to its own class)"
             if not mislabelled else
             f"prototype labels: WRONG for {len(mislabelled)} of {len(b.prototypes)} prototypes (ids "
             f"{', '.join(map(str, mislabelled[:10]))}{', ...' if len(mislabelled) > 10 else ''}): they vote for "
             f"another class than the one they are shown with; re-export a run trained by this nasx")
        _print_agreement("ONNX Runtime vs stored PyTorch outputs", report["onnx_vs_stored_pytorch"])
        if isinstance(report["live_pytorch"], dict):
            for fmt, a in report["live_pytorch"].items():
                _print_agreement(f"{fmt} vs PyTorch from weights.safetensors", a)
        else:
            _say(report["live_pytorch"])
        unloaded = [fmt for fmt, state in report["torch_files"].items() if state.startswith("sha256")]
        if unloaded:
            _say(f"{', '.join(unloaded)}: sha256 ok, not loaded (loading them executes code from the bundle; "
                 f"--trust-torch-files if you trust it)")
    if not ok:
        raise BundleError(f"{bundle} failed verification (see above)")


def _signature_state(root: Path, trusted_key: Optional[Path]) -> str:
    from nasxserve.runtime.signing import SIGNATURE_FILE
    if trusted_key is not None:
        return f"ok (signed by the trusted key {trusted_key})"      # load_bundle has checked it
    if (root / SIGNATURE_FILE).is_file():
        return "present, not checked (--trusted-key KEY.pub checks it)"
    return "none (the bundle is not signed)"


def _print_agreement(label: str, a: dict[str, Any]) -> None:
    worst = ", ".join(f"{k} {v:.1e}" for k, v in sorted(a["max_abs"].items()))
    _say(f"{label}: {'ok' if a['ok'] else 'MISMATCH'} on {a['images']} images (max abs: {worst}; "
         f"top-1 mismatches {a['top1_mismatches']}, best_patch mismatches {a['best_patch_mismatches']})")


def _say(line: str) -> None:
    """One line of a report on stdout, as written (no markup: 'nasx[train]' stays whole)."""
    stdout_console().print(line, markup=False)


def predict(
    bundle: Path = typer.Argument(..., help="Bundle folder (from nasx export)."),
    images: list[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1, help="Classes to list per image."),
    provider: str = PROVIDER,
    as_json: bool = JSON,
) -> None:
    """Classify images with a bundle (ONNX Runtime; no torch needed)."""
    b = _load(bundle, provider)
    results = b.predict([str(p) for p in images], top_k=top_k, errors="report")
    if as_json:
        print(json.dumps([dict(r, file=str(p)) for p, r in zip(images, results)], indent=2))
    else:
        _print_predictions(bundle, b.provider, images, results)
        _print_warnings(images, results)
    _exit_if_failed(results)


def _print_predictions(bundle: Path, provider: str, images: list[Path], results: list[dict[str, Any]]) -> None:
    """A table of the classified images, then a line ``PATH: error: REASON`` per image that was not: a
    table squeezed into a narrow terminal cuts long cells with an ellipsis, a line keeps the whole path and
    reason. The table folds long paths and class names instead of cutting them."""
    screen = stdout_console()
    classified = [(p, r) for p, r in zip(images, results) if "error" not in r]
    if classified:
        table = Table()
        table.add_column("image", overflow="fold")
        table.add_column("class", overflow="fold")
        table.add_column("probability", justify="right")
        table.add_column("runners-up", overflow="fold")
        for p, r in classified:
            top, rest = r["predictions"][0], r["predictions"][1:]
            table.add_row(Text(str(p)), Text(top["class"]), f"{top['probability']:.4f}",
                          Text(", ".join(f"{q['class']} {q['probability']:.3f}" for q in rest)))
        screen.print(table)
        _line(screen, f"{bundle} on ONNX Runtime {provider}")
    for p, r in zip(images, results):
        if "error" in r:                    # the reason usually names the file already
            reason = r["error"].removeprefix(f"{p}: ")
            _line(screen, Text.assemble(str(p), ": ", ("error", "red"), f": {reason}"))


def _print_warnings(images: list[Path], results: list[dict[str, Any]]) -> None:
    """``PATH: warning: ...`` on stderr for each input that looks unlike the training images."""
    for p, r in zip(images, results):
        for warning in r.get("warnings", []):
            console.print(Text.assemble(str(p), ": ", ("warning", "yellow"), f": {warning}"), soft_wrap=True)


def _line(screen: Console, text: str | Text) -> None:
    """A line as written: no markup, no wrapping (a terminal folds it, a pipe gets it whole)."""
    screen.print(text if isinstance(text, Text) else Text(text), soft_wrap=True)


def _exit_if_failed(results: list[dict[str, Any]]) -> None:
    failed = sum("error" in r for r in results)
    if failed:
        console.print(f"[red]{failed} of {len(results)} images could not be used[/red]")
        sys.exit(2)


def explain(
    bundle: Path = typer.Argument(..., help="Bundle folder (from nasx export)."),
    image: Path = typer.Argument(..., help="Image file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Write the explanation figure to this .png file (an existing one is "
                                            "replaced)."),
    top_prototypes: int = typer.Option(5, "--top-prototypes", "-n", min=1,
                                       help="Prototypes to show (largest contributions first)."),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="Classes to explain (the figure shows the first)."),
    regions: str = typer.Option(DEFAULT_REGION_RULE, "--regions", metavar="RULE",
                                help="What the boxes show: evidence (the input each prototype's similarity depends "
                                     "on: hiding it lowers the similarity most) or activation (where its similarity "
                                     "map peaks, ProtoPNet's box)."),
    provider: str = PROVIDER,
    as_json: bool = JSON,
) -> None:
    """Explain one prediction: the prototypes it rests on, where their evidence lies, what each adds."""
    if regions not in REGION_RULES:
        raise ConfigError(f"--regions {regions}: choose one of {', '.join(REGION_RULES)}")
    if out is not None and out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the figure is a PNG image; give it a name ending in .png")
    b = _load(bundle, provider)
    result = b.explain([str(image)], top_k=top_k, top_prototypes=top_prototypes, regions=regions)[0]
    if not as_json:
        _print_warnings([image], [result])
    if out is not None:
        _write_figure(b, image, result, out)
    if as_json:
        print(json.dumps(dict(result, file=str(image)), indent=2))
    else:
        screen = stdout_console()
        for cls in result["explanations"]:
            _line(screen, f"{image}: class {cls['class']} (p = {cls['probability']:.4f}, logit {cls['logit']:.3f} "
                          f"= sum of contributions {cls['evidence_total']:.3f})")
            table = Table()
            for col in ("prototype", "its class", "similarity", "weight", "contribution",
                        f"{regions} box (x0, y0, x1, y1)"):
                table.add_column(col, overflow="fold")
            for ev in cls["evidence"]:
                table.add_row(_prototype_ids(ev), Text(ev["prototype_class"]), f"{ev['similarity']:.3f}",
                              f"{ev['weight']:.3f}", f"{ev['contribution']:+.3f}", str(tuple(ev["box"])))
            # as the figure's footer: the rows shown and the rest add up to the logit
            rest = cls["evidence_total"] - sum(ev["contribution"] for ev in cls["evidence"])
            table.add_section()
            table.add_row("the others", "", "", "", f"{rest:+.3f}", "")
            screen.print(table)
            if cls.get("own_class_share") is not None:
                _line(screen, f"{cls['own_class_share']:.0%} of the absolute evidence for {cls['class']} comes from "
                              "its own prototypes")
    if out is not None and not as_json:
        console.print(f"figure: {out}", markup=False)


def _prototype_ids(evidence: dict[str, Any]) -> str:
    """``22``, or ``22 (= 27, 31)`` for a prototype listed with its identical twins."""
    twins = evidence.get("duplicates") or []
    return str(evidence["prototype"]) + (f" (= {', '.join(map(str, twins))})" if twins else "")


def _write_figure(b, image: Path, result: dict[str, Any], out: Path) -> None:
    from nasxserve.explain.figure import render_explanation
    from nasxserve.imaging import open_image, to_model_mode
    from nasxserve.io import atomic_write
    # the boxes are in the pixels of the decoded, upright image the model was given
    fig = render_explanation(to_model_mode(open_image(str(image)), b.channels), result, 0, b.file_bytes,
                             title=f"{image.name}: predicted {result['predictions'][0]['class']} "
                                   f"(p = {result['predictions'][0]['probability']:.3f})")
    atomic_write(out, lambda f: fig.save(f, format="PNG"))
