"""The task group: dispatch, the ring, a job's life, one file's transfer, the tally, limits, retry, AIMD."""
