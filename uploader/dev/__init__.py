"""Real servers for the demo, the tests and the bench: beanstalkd, Redis (cluster, sentinel), Azurite."""
