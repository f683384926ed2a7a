"""``python -m jobs.pipeline ARGS...``: ``forge-ray pipeline`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("pipeline"))
