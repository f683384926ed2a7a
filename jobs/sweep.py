"""``python -m jobs.sweep ARGS...``: ``forge-ray sweep`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("sweep"))
