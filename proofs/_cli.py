"""``nonsmooth prove [NAME...]``: check the SymPy certificates from the shell.

Exit status: 0 when every selected certificate verifies, 1 when one fails, 2 for a
usage error (unknown name, unwritable ``--json`` path).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nonsmooth prove",
        description="Check SymPy certificates: the rule table against the engine's registry, soft "
                    "sort/rank Jacobians, perturbed optimizers, implicit and spurious derivatives, "
                    "conservativity along paths. Exit status 1 if any certificate fails.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="proofs to check (shell patterns such as 'rule:*' allowed; default: all)")
    p.add_argument("--list", action="store_true", help="list the proofs with their statements and exit")
    p.add_argument("--json", metavar="PATH", help="also write the certificates as JSON to PATH")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every certificate's derivation (failed ones are always printed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _bar(done: int, total: int, name: str, width: int = 24) -> None:
    filled = int(width * done / total) if total else width
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:40]:<40}"
    sys.stderr.write(line if name else line + "\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    """Run ``nonsmooth prove`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Example:
        >>> from nonsmooth.proofs._cli import main
        >>> main(["spurious_derivative", "--no-progress"])  # doctest: +ELLIPSIS
        VERIFIED  spurious_derivative ...
        0
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from ._catalog import _select, catalog

    proofs = catalog()
    try:
        selected = _select(proofs, args.names or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for proof in selected:
            print(f"{proof.name}\n    {proof.statement}")
        return 0
    out_path = Path(args.json) if args.json else None
    if out_path is not None and not out_path.parent.exists():
        print(f"error: --json {args.json!r}: folder {str(out_path.parent)!r} does not exist", file=sys.stderr)
        return 2

    certificates = []
    for i, proof in enumerate(selected):
        if not args.no_progress:
            _bar(i, len(selected), proof.name)
        certificates.append(proof.check())
    if not args.no_progress:
        _bar(len(selected), len(selected), "")

    for cert in certificates:
        verdict = "VERIFIED" if cert.verified else "FAILED  "
        print(f"{verdict}  {cert.name}  ({cert.checks} checks, {cert.seconds:.2f} s)")
        if args.verbose or not cert.verified:
            print("\n".join("    " + line for line in cert.explain().splitlines()[1:]))
    failed = [c.name for c in certificates if not c.verified]
    print(f"{len(certificates) - len(failed)}/{len(certificates)} certificates verified"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if out_path is not None:
        try:
            out_path.write_text(json.dumps({"proofs": [p.to_json() for p in selected],
                                            "certificates": [c.to_json() for c in certificates]},
                                           indent=1) + "\n")
        except OSError as exc:
            print(f"error: could not write --json {args.json!r}: {exc}", file=sys.stderr)
            return 2
    return 1 if failed else 0
