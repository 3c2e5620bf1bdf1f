"""Command-line options shared by several `pcrfs` commands (kept apart so that every
command module can import them without importing the others)."""
from __future__ import annotations

import click

from ..units import parse_size


def endpoint_option(fn):
    """``--endpoint-url`` for commands that take a STORE (which may be an s3:// URL)."""
    return click.option(
        "--endpoint-url", metavar="URL", default=None,
        help="S3-compatible endpoint for s3:// stores (MinIO, Ceph, moto ...) [default: AWS, or "
             "$AWS_ENDPOINT_URL]. Credentials and region come from the usual AWS variables/files.")(fn)


class SizeType(click.ParamType):
    """A click option value such as 64M or 2G (see :func:`parse_size`)."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()
