"""``python -m jobs.sid_metrics ARGS...``: ``forge-ray sid-metrics`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("sid-metrics"))
