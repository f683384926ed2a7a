"""``python -m jobs.embed ARGS...``: ``forge-ray embed`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("embed"))
