"""``python -m ichpipe predict ...``: run a model bundle on new studies (ichpipe.predict); ``python -m ichpipe
evaluate ...``: a bundle on labelled studies (ichpipe.evaluate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ichpipe.cli import report_errors


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count given on the command line, checked as a config's)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ichpipe", description="ichpipe commands")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="run a model bundle on a folder or zip of DICOMs",
                       description="Research tool, not a medical device: not for diagnosis.")
    p.add_argument("path", nargs="?", help="a folder (searched recursively) or a zip of DICOM files")
    p.add_argument("--bundle", required=True, help="a bundle folder or .tar.gz (make bundle)")
    p.add_argument("--out", required=True, help="output folder (with --kaggle: the submission .csv.gz)")
    p.add_argument("--min-slices", type=at_least_one, default=1, help="skip series with fewer slices (default 1)")
    p.add_argument("--no-figures", action="store_true", help="skip the per-series figures")
    p.add_argument("--dicom-sc", action="store_true",
                   help="also write each series' figure as a DICOM Secondary Capture in its study (for a PACS)")
    p.add_argument("--dicom-sr", action="store_true",
                   help="also write each series' findings as a DICOM Structured Report (TID 1500) in its study")
    p.add_argument("--kaggle", metavar="DATA_DIR", help="predict DATA_DIR/stage_2_test into a validated submission")
    e = sub.add_parser("evaluate", help="a bundle on labelled studies: AUCs with CIs, operating points, figures",
                       description="Research tool, not a medical device: not for diagnosis.")
    e.add_argument("path", help="a folder (searched recursively) or a zip of DICOM studies")
    e.add_argument("--bundle", required=True, help="a bundle folder or .tar.gz (make bundle)")
    e.add_argument("--labels", required=True, help="CQ500's reads.csv, or an ID,Label file (stage_2_train.csv)")
    e.add_argument("--out", required=True, help="output folder (its cache/ lets a killed evaluation continue)")
    e.add_argument("--masks", help="bleed masks per slice (the synthetic set's synthetic_masks/): the pointing game")
    e.add_argument("--bootstrap", type=at_least_one, default=1000, help="bootstrap resamples for the CIs")
    for q in (p, e):
        q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    import torch

    device = None if args.device == "auto" else torch.device(args.device)
    if args.command == "evaluate":
        return report_errors(lambda: _evaluate(args, device))
    from ichpipe.predict import predict, predict_kaggle

    if not args.kaggle and not args.path:
        parser.error("give PATH (a folder or zip of DICOMs), or --kaggle DATA_DIR")

    def run() -> int:
        if args.kaggle:
            r = predict_kaggle(args.kaggle, args.bundle, args.out)
            print(f"submission for {r['slices']} test slices written and validated: {r['file']}"
                  + (f" ({r['filled']} images without a prediction got the prior)" if r["filled"] else ""))
            return 0
        r = predict(args.path, args.bundle, args.out, args.min_slices, not args.no_figures, device=device,
                    dicom_sc=args.dicom_sc, dicom_sr=args.dicom_sr)
        for s in r["skipped"]:
            print(f"skipped {s['what']}: {s['reason']}")
        for line in r["warnings"]:
            print(f"warning: {line}")
        print(f"{r['series']} series, {r['slices']} slices in {r['seconds']:.1f} s -> {r['out']}/slices.csv, "
              "series.csv (research tool, not for diagnosis)")
        return 0

    return report_errors(run)


def _evaluate(args, device) -> int:
    from ichpipe.evaluate import evaluate

    r = evaluate(args.path, args.bundle, args.labels, args.out, masks=args.masks, n_boot=args.bootstrap, device=device)
    print((Path(r["out"]) / "report.md").read_text())
    print(f"{r['studies']} studies in {r['seconds']:.0f} s -> {r['out']}/report.md, metrics.json, roc.png, misses/ "
          "(research tool, not for diagnosis)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
