"""Command-line options shared by several `pcrfs` commands (kept apart so that every
command module can import them without importing the others)."""
from __future__ import annotations

import click


def endpoint_option(fn):
    """``--endpoint-url`` for commands that take a STORE (which may be an s3:// URL)."""
    return click.option(
        "--endpoint-url", metavar="URL", default=None,
        help="S3-compatible endpoint for s3:// stores (MinIO, Ceph, moto ...) [default: AWS, or "
             "$AWS_ENDPOINT_URL]. Credentials and region come from the usual AWS variables/files.")(fn)
