"""nanochat report generate: assemble report.md (also copied to the current directory)."""
import argparse

from nanochat.report import get_report


def main(argv=None):
    p = argparse.ArgumentParser(description="Assemble $NANOCHAT_BASE_DIR/report/report.md from the stages' sections.")
    p.add_argument("--no-copy", action="store_true", help="do not copy report.md into the current directory")
    args = p.parse_args(argv)
    path = get_report().generate(copy_to=None if args.no_copy else ".")
    print(f"report written to {path}" + ("" if args.no_copy else " and ./report.md"))
    return 0
