"""uploader: uploads files queued through beanstalkd and Redis to blob storage."""

__version__ = "0.1.0"
