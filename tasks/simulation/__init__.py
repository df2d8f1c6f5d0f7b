"""Executors of simulation jobs: relaxations, molecular dynamics and single points, and merging replicas."""
