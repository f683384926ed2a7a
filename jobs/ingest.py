"""``python -m jobs.ingest ARGS...``: ``forge-ray ingest`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("ingest"))
