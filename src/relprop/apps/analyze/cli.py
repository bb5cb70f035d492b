"""`relprop analyze OUT_DIR`: SpRAy on an explain-dataset folder, its HTML page, and with
--virelay a ViRelAy project."""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

from ...errors import RelpropError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="find distinct strategies per class in an explain-dataset folder",
        description="Spectral relevance analysis (SpRAy) per class of an explain-dataset "
        "output: writes OUT_DIR/spray.h5 (ViRelAy's analysis layout), "
        "OUT_DIR/spray_eigenvalues.png and OUT_DIR/analysis.html; with --virelay also a "
        "ViRelAy project (OUT_DIR/virelay/project.yaml). Runs on one machine.")
    p.add_argument("out_dir", type=Path, help="the folder explain-dataset wrote")
    p.add_argument("--classes", type=int, nargs="+", help="only these classes (default all)")
    p.add_argument("--by", choices=["label", "target"], default="label",
                   help="group samples by their label (default) or the explained class")
    p.add_argument("--grid", type=int, default=7, help="pool heatmaps to GRIDxGRID (7)")
    p.add_argument("--neighbors", type=int, default=10, help="kNN graph neighbours (10)")
    p.add_argument("--ks", default="2,3,4,5", help="cluster counts (default 2,3,4,5)")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE (faster)")
    p.add_argument("--virelay", action="store_true",
                   help="also write a ViRelAy project (needs the image files' paths, i.e. "
                   "a run over a folder of images)")


def run(args: Namespace) -> None:
    from ...analysis.spray import SpraySettings, spray
    from .page import summary_page

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError as exc:
        raise RelpropError(f"--ks {args.ks!r}: comma-separated integers, e.g. 2,3,4") from exc
    settings = SpraySettings(grid=args.grid, n_neighbors=args.neighbors, ks=ks,
                             tsne=not args.no_tsne)
    result = spray(args.out_dir, classes=args.classes, by=args.by, settings=settings)
    plot = result.eigenvalue_plot(args.out_dir / "spray_eigenvalues.png")
    page = summary_page(result, args.out_dir / "analysis.html")
    # smallest second eigenvalue first: a group the kNN graph (almost) cuts off
    for c, a in sorted(result.classes.items(), key=lambda item: item[1].eigenvalues[1]):
        sizes = "/".join(str(len(v)) for v in a.members(f"kmeans-{a.suggested_k}").values())
        print(f"class {c}: {len(a.indices)} samples, eigenvalues "
              f"{' '.join(f'{v:.3f}' for v in a.eigenvalues[:4])}; eigengap k="
              f"{a.suggested_k} (clusters {sizes})")
    print(f"wrote {result.path}, {plot} and {page} in {result.seconds:.1f} s", file=sys.stderr)
    if args.virelay:
        from ...analysis.virelay_export import export_virelay

        project = export_virelay(args.out_dir)
        print(f"wrote {project}; open it with: python -m virelay {project}", file=sys.stderr)
