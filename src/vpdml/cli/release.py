"""``vpdml push``: a finished run to the Hub."""

from __future__ import annotations

import argparse

# --------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="The --output-dir of a finished `vpdml train` run."
    )
    parser.add_argument(
        "--repo", required=True, help="Hub repository to upload to (owner/name; created if needed)."
    )
    parser.add_argument(
        "--hub-token",
        help="Hub token (default: HF_TOKEN, else the saved `hf auth login`). Never written or printed.",
    )
    parser.add_argument(
        "--private",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Create the repository as private (ignored when it exists; default: --no-private).",
    )
    parser.add_argument(
        "--revision", help="Branch to upload to (created from the default branch if missing)."
    )
    return parser


def run_push(namespace: argparse.Namespace) -> str:
    """Upload the run's release files and print the repository URL."""
    from vpdml.training.outputs import push_run_folder

    url = push_run_folder(
        namespace.run_dir,
        namespace.repo,
        token=namespace.hub_token,
        private=namespace.private,
        revision=namespace.revision,
    )
    print(f"Uploaded {namespace.run_dir} to {url}")
    return url
