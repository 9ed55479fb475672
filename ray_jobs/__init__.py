"""ray_jobs: thin entry points: the k2pipe command line, Ray job submission, the code a Ray job runs."""
