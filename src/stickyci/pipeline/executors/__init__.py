"""Executors run a planned pipeline: ``local`` on this machine, ``dask`` on a Dask cluster.

Both share the DAG (:mod:`.base`: needs, ``if``, skips, cancellation, cold disks) and run
each job with the same :class:`~stickyci.pipeline.job.JobRunner`; they differ only in where
a job runs.
"""
