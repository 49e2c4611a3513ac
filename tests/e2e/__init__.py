"""Tests that start real `gateway serve` and `gateway sim` processes (and, where they need them,
a real `redis-server` or PostgreSQL) and talk to them as clients do: the OpenAI, gRPC and admin
APIs, quotas across replicas, stopping, the demo and the locustfile."""
