"""Tests of the Kubernetes deployment (k8s/), without a cluster, a Docker engine or helm."""
