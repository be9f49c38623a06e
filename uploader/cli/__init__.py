"""The `uploader` command line: the parser (main.py), shared plumbing, the job commands, recover, demo."""
