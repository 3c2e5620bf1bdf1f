"""`pcrfs convert`: an image tree in, a PCR store out; the source is only ever read.

The sorted listing is cut into batches by source bytes (:mod:`.plan`); batch r
becomes record r. Locally, images are processed in that order by a thread pool
(:mod:`.local`; the libjpeg-turbo transform and Pillow release the GIL) and each
batch is written as a record when its last file is in; on a Dask cluster
(:mod:`.dask`) each batch is one task. Either way records reach the store through
one :class:`~pcrfs.store.write.sink.RecordSink`, the store is identical whatever the
worker count, and a re-run resumes with the records not yet finished.

The store may also be a URL (``s3://bucket/prefix``): the writer's state then waits
in a local staging directory (:mod:`.target`) while records are uploaded as they
are finished, the manifest last.
"""
from .plan import Batch, SourceFile, SourceListing, bad_name, list_sources, plan_batches
from .run import ConvertResult, convert
from .target import StoreBusy, StoreExists

__all__ = ["Batch", "ConvertResult", "SourceFile", "SourceListing", "StoreBusy", "StoreExists", "bad_name",
           "convert", "list_sources", "plan_batches"]
