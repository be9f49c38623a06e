"""The beanstalkd job source: the wire protocol, reserving and settling, the servers' verdicts."""
