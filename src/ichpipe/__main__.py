"""The ``python -m ichpipe`` commands: ``predict`` (a model bundle on new studies, ichpipe.stages.predict),
``evaluate`` (a bundle on labelled studies, ichpipe.stages.evaluate), ``score`` (any predictions file against
labels) and ``validate`` (a submission against the sample submission)."""

from __future__ import annotations

import argparse
import sys

from ichpipe.base.cli import report_errors


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count given on the command line, checked as a config's)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def score(args) -> int:
    """``python -m ichpipe score PRED.csv --labels stage_2_train.csv``: the weighted log loss of any predictions."""
    import json

    from ichpipe.scoring.metrics import format_scores, score_files

    result = score_files(args.pred, args.labels, args.eps)
    print(json.dumps(result, indent=2) if args.json else format_scores(result))
    return 0


def validate(args) -> int:
    """``python -m ichpipe validate FILE --sample ...``: every reason Kaggle would reject a submission (exit 1)."""
    from ichpipe.scoring.submission import check_submission

    problems = check_submission(args.file, args.sample)
    for line in problems:
        print(f"invalid: {args.file}: {line}", file=sys.stderr)
    if not problems:
        print(f"valid: {args.file}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    from ichpipe.scoring.metrics import EPS

    parser = argparse.ArgumentParser(prog="python -m ichpipe", description="ichpipe commands: predict, evaluate, "
                                     "score (a predictions file), validate (a submission file)")
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="the weighted log loss (any x2) and per-class losses of an ID,Label file")
    sc.add_argument("pred")
    sc.add_argument("--labels", required=True, help="ID,Label truth file (stage_2_train.csv works as is)")
    sc.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sc.add_argument("--eps", type=float, default=EPS, help="clip predictions to [eps, 1-eps]")
    va = sub.add_parser("validate", help="check a submission CSV against the sample submission")
    va.add_argument("file")
    va.add_argument("--sample", required=True, help="stage_2_sample_submission.csv")
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
    if args.command in ("score", "validate"):
        return report_errors(lambda: (score if args.command == "score" else validate)(args))
    import torch

    device = None if args.device == "auto" else torch.device(args.device)
    if args.command == "evaluate":
        return report_errors(lambda: _evaluate(args, device))
    from ichpipe.stages.predict import predict, predict_kaggle

    if not args.kaggle and not args.path:
        parser.error("give PATH (a folder or zip of DICOMs), or --kaggle DATA_DIR")

    def run() -> int:
        if args.kaggle:
            r = predict_kaggle(args.kaggle, args.bundle, args.out)
            print(f"submission for {r.prediction.slices} test slices written and validated: {r.file}"
                  + (f" ({r.filled} images without a prediction got the prior)" if r.filled else ""))
            return 0
        r = predict(args.path, args.bundle, args.out, args.min_slices, not args.no_figures, device=device,
                    dicom_sc=args.dicom_sc, dicom_sr=args.dicom_sr)
        for s in r.skipped:
            print(f"skipped {s['what']}: {s['reason']}")
        for line in r.warnings:
            print(f"warning: {line}")
        print(f"{r.series} series, {r.slices} slices in {r.seconds:.1f} s -> {r.out}/slices.csv, "
              "series.csv (research tool, not for diagnosis)")
        return 0

    return report_errors(run)


def _evaluate(args, device) -> int:
    from ichpipe.stages.evaluate import evaluate

    r = evaluate(args.path, args.bundle, args.labels, args.out, masks=args.masks, n_boot=args.bootstrap, device=device)
    print((r.out / "report.md").read_text())
    print(f"{r.studies} studies in {r.seconds:.0f} s -> {r.out}/report.md, metrics.json, roc.png, misses/ "
          "(research tool, not for diagnosis)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
