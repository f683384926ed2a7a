"""``python -m jobs.assign ARGS...``: ``forge-ray assign`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("assign"))
