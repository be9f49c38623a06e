"""Prometheus metrics, one registry per daemon so tests can run several side by side."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.files = Counter("uploader_files", "Files settled, by outcome.", ["outcome"], registry=r)
        self.bytes = Counter("uploader_bytes", "Bytes uploaded.", registry=r)
        self.upload_seconds = Histogram(
            "uploader_upload_seconds",
            "Time to upload one file, retries included.",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.retries = Counter(
            "uploader_retries", "Upload attempts retried, by reason.", ["reason"], registry=r
        )
        self.inflight = Gauge("uploader_inflight_uploads", "Uploads in flight.", registry=r)
        self.slots = Gauge("uploader_upload_slots", "Upload slots (concurrency) in force.", registry=r)
        self.slot_cuts = Counter(
            "uploader_upload_slot_cuts", "Upload slots cut because the store throttled (AIMD).", registry=r
        )
        self.active_jobs = Gauge("uploader_active_jobs", "Jobs reserved and being worked on.", registry=r)
        self.jobs = Counter("uploader_jobs_finished", "Jobs finished, by final state.", ["state"], registry=r)
        self.jobs_released = Counter(
            "uploader_jobs_released", "Jobs released back to beanstalkd.", registry=r
        )
        self.draining = Gauge("uploader_draining", "1 while the daemon drains.", registry=r)
        self.taking_no_work = Gauge(
            "uploader_taking_no_work", "1 while an outage keeps the daemon from taking work, by cause.",
            ["cause"], registry=r,
        )
        self.tube_ready = Gauge(
            "uploader_tube_ready_jobs", "Ready jobs per watched tube.", ["tube"], registry=r
        )
        self.source_up = Gauge(
            "uploader_source_up", "1 while this beanstalkd server answers and can be reserved from.",
            ["server"], registry=r,
        )
        self.reloads = Counter(
            "uploader_config_reloads", "SIGHUP reloads, by result (ok, refused).", ["result"], registry=r
        )
        self.files_uploaded = self.files.labels("uploaded")
        self.files_skipped = self.files.labels("skipped")
        self.files_failed = self.files.labels("failed")
