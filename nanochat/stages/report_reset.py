"""nanochat report reset: start a new report card (environment header; old sections removed)."""
import argparse

from nanochat.report import get_report


def main(argv=None):
    argparse.ArgumentParser(description="Start a new report card in $NANOCHAT_BASE_DIR/report.").parse_args(argv)
    path = get_report().reset()
    print(f"report reset: {path}")
    return 0
